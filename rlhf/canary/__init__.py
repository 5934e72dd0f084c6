"""Canary promotion: users' feedback as the last gate for a new policy version.

`decision` is the sequential test (promote / roll back / keep collecting, with a stated
false-promotion rate), `controller` the state over a stream of feedback records and the
sticky traffic split, `config` their settings. Pure Python and NumPy: no I/O, no clock, no
grpc or Kafka; a service hosts it (docs/canary.md).
"""

from rlhf.canary.config import CanaryConfig
from rlhf.canary.controller import (
    Admission,
    CanaryController,
    CanaryOutcome,
    FeedbackRecord,
    Proposal,
    Step,
    assign,
)
from rlhf.canary.decision import CanaryEvidence, Decision, MixturePrior, Verdict, decide

__all__ = [
    "Admission",
    "CanaryConfig",
    "CanaryController",
    "CanaryEvidence",
    "CanaryOutcome",
    "Decision",
    "FeedbackRecord",
    "MixturePrior",
    "Proposal",
    "Step",
    "Verdict",
    "assign",
    "decide",
]
