"""The errors a request can meet, by kind: what servicers and the library code they call raise.

A servicer never picks a gRPC status code itself: it raises one of these (or lets one
raised deeper pass), and the scaffold's server (rlhf/serving/server.py, `STATUS_CODES`)
answers the call with the kind's status code and the exception's message as the details.
The message is for the caller: it names what to fix (the field and the limit it broke,
the version that is missing) and never carries a stack trace. Any other exception is a
bug, and gRPC answers it UNKNOWN as before.

No grpc here: the library (rlhf.generation, rlhf.learner) raises these without loading it.
"""

from __future__ import annotations


class RequestError(Exception):
    """A request the service refuses; `str(e)` is what the caller reads."""


class InvalidArgument(RequestError, ValueError):
    """The request itself is wrong and the caller can fix it: the message names the field
    and the limit, e.g. "items: 300 items > limit 256 (RLHF_REWARD_MAX_ITEMS)"."""


class NotFound(RequestError, LookupError):
    """The request names something (a version) that does not exist."""


class FailedPrecondition(RequestError):
    """Well-formed, but the state it names does not allow it (a version never promoted)."""


class PermissionDenied(RequestError):
    """Well-formed and authenticated, but not allowed (weights the learner did not publish)."""


class Unavailable(RequestError):
    """Not now: still loading, or shutting down. The caller retries (another replica)."""


class Internal(RequestError):
    """The service failed while serving a valid request; the cause is in its log, not here."""
