"""The frozen reference policy π_ref and its gRPC service.

model     ReferenceModel: per-token log-probs of responses under π_ref (exact or padded batching)
servicer  ReferenceServicer: LogProbs and GetInfo over gRPC (rlhf.v1.ReferenceService);
          imported by the service, not here, so importing rlhf.reference loads no grpc
"""

from rlhf.reference.model import EXACT, PADDED, ReferenceModel

__all__ = ["EXACT", "PADDED", "ReferenceModel"]
