"""``ray``: host tensors through Ray's object store (any placement of policy and engines).

The driver holds host copies of the HF-named tensors; each bucket of ``TensorPiece``s is
``ray.put`` once and read by every engine actor, whose in-process vLLM engine hands the pieces to
its worker (``collective_rpc``), where they are staged (``RolloutEngine.receive_weight_bucket``).
"""

from __future__ import annotations

from typing import Any, Sequence

from skyrl_mtp.inference.transports.base import WeightSyncStats, WeightTransport
from skyrl_mtp.inference.transports.buckets import NamedTensors, iter_buckets


class RayObjectStoreTransport(WeightTransport):
    """Buckets of host tensors through Ray's object store, staged in each engine's worker and
    applied by the shared two-phase push (``WeightTransport.push``)."""

    name = "ray"

    def deliver(self, engines: Sequence[Any], source: NamedTensors, version: int, stats: WeightSyncStats) -> None:
        import ray

        from skyrl_mtp.inference.remote import gather

        for index, bucket in enumerate(iter_buckets(source, self.bucket_bytes)):
            ref = ray.put(bucket)
            gather([(e, e.actor.receive_weight_bucket.remote(version, index, ref)) for e in engines],
                   f"weight bucket {index} of version {version}", self.timeout_s)
            del ref  # let the object store free the bucket
            stats.add_bucket(num_whole=sum(1 for p in bucket if p.row_start == 0),
                             nbytes=sum(p.nbytes for p in bucket))
