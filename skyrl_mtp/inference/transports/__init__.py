"""Weight transports: how the policy's HF-named tensors reach the rollout engines.

    base       the two-phase push every transport shares (begin -> deliver -> prepare -> finish,
               abort on failure), ``WeightSyncStats`` and the registry (``transport_class``)
    buckets    the wire format: buckets of ``TensorPiece``s, packing into flat buffers, staging
    ray        host tensors through Ray's object store (any placement)
    cuda_ipc   GPU to GPU through CUDA IPC handles (engines on the policy's GPU)
    broadcast  a torch.distributed broadcast from the policy to every engine worker (NCCL on GPUs,
               gloo on CPU): engines on other GPUs and nodes

Each transport module imports ``base`` and ``buckets`` only; ``base`` finds the transports by name.
"""
