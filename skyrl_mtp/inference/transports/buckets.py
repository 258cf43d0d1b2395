"""The wire format of a weight sync, shared by every transport and by the engines (pure torch).

- ``iter_buckets``: HF-named tensors -> buckets (lists of ``TensorPiece``) of at most
  ``bucket_bytes`` each, in the order given; a tensor larger than the bound is split along dim 0
  into row ranges.
- ``pack_bucket`` / ``unpack_bucket``: one bucket <-> one flat uint8 buffer described by a
  ``PieceSpec`` per piece (offsets aligned to ``ALIGN`` bytes, so each piece can be viewed back in
  its dtype). The transports that move a buffer instead of Python objects (``cuda_ipc``,
  ``broadcast``) use it; the specs travel as metadata.
- ``StagedWeights`` (receiving side): the pieces of one sync reassembled into whole tensors, with
  a check that every row of a split tensor arrived exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch

NamedTensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]

ALIGN = 256  # bytes; also what the CUDA caching allocator aligns to


# ----------------------------------------------------------------------------------------------
# Bucketing (sender side)
# ----------------------------------------------------------------------------------------------

@dataclass
class TensorPiece:
    """Rows ``[row_start, row_start + len(tensor))`` of the tensor ``name`` of shape ``full_shape``
    (the whole tensor when ``row_start == 0`` and the shapes agree)."""

    name: str
    tensor: torch.Tensor
    row_start: int
    full_shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def is_whole(self) -> bool:
        return self.row_start == 0 and tuple(self.tensor.shape) == self.full_shape


def named_tensor_items(named_tensors: NamedTensors) -> Iterator[tuple[str, torch.Tensor]]:
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    for item in items:
        name, tensor = item
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight sync expects (str, torch.Tensor) pairs, got ({type(name).__name__}, "
                            f"{type(tensor).__name__})")
        yield name, tensor


def to_wire(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor that owns exactly its bytes: pickling a view would ship its whole storage
    (e.g. a Megatron flat parameter buffer) with every piece."""
    t = tensor.detach().to("cpu")
    if (not t.is_contiguous() or t.storage_offset() != 0
            or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
        t = t.contiguous().clone()
    return t


def split_rows(name: str, tensor: torch.Tensor, bucket_bytes: int,
               to_wire: Callable[[torch.Tensor], torch.Tensor] = to_wire) -> list[TensorPiece]:
    """The tensor as one piece, or as row ranges of at most ``bucket_bytes`` each; ``to_wire``
    makes each piece's tensor (default: a CPU copy that owns its bytes)."""
    full_shape = tuple(tensor.shape)
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes <= bucket_bytes:
        return [TensorPiece(name, to_wire(tensor), 0, full_shape)]
    if tensor.dim() == 0:
        raise ValueError(f"weight sync: scalar tensor {name!r} ({nbytes} bytes) exceeds bucket_bytes={bucket_bytes}")
    row_bytes = nbytes // full_shape[0]
    rows_per_piece = bucket_bytes // row_bytes if row_bytes else full_shape[0]
    if rows_per_piece < 1:
        raise ValueError(f"weight sync: one row of tensor {name!r} is {row_bytes} bytes, more than "
                         f"bucket_bytes={bucket_bytes}; raise bucket_bytes")
    pieces = []
    for start in range(0, full_shape[0], rows_per_piece):
        rows = tensor.detach()[start:start + rows_per_piece]
        pieces.append(TensorPiece(name, to_wire(rows), start, full_shape))
    return pieces


def iter_buckets(named_tensors: NamedTensors, bucket_bytes: int,
                 to_wire: Callable[[torch.Tensor], torch.Tensor] = to_wire) -> Iterator[list[TensorPiece]]:
    """Groups the tensors, in the order given, into buckets of at most ``bucket_bytes``.

    With the default ``to_wire``, tensors are moved to CPU one at a time as their bucket fills, so
    the sender holds at most one bucket of copies. ``to_wire=torch.Tensor.detach`` plans buckets
    over the tensors where they are, without copies (for transports that pack a buffer).
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[TensorPiece] = []
    size = 0
    for name, tensor in named_tensor_items(named_tensors):
        for piece in split_rows(name, tensor, bucket_bytes, to_wire):
            if bucket and size + piece.nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append(piece)
            size += piece.nbytes
    if bucket:
        yield bucket


# ----------------------------------------------------------------------------------------------
# Packing into one flat buffer (cuda_ipc, broadcast)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PieceSpec:
    """Where one ``TensorPiece`` lies in a packed bucket."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    row_start: int
    full_shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def packed_size(pieces: Sequence[TensorPiece]) -> int:
    return sum(_aligned(p.nbytes) for p in pieces)


def piece_specs(pieces: Sequence[TensorPiece]) -> tuple[PieceSpec, ...]:
    """The specs ``pack_bucket`` will produce for these pieces (no copies: the plan of a bucket)."""
    specs, offset = [], 0
    for p in pieces:
        specs.append(PieceSpec(p.name, p.tensor.dtype, tuple(p.tensor.shape), offset, p.row_start,
                               tuple(p.full_shape)))
        offset += _aligned(p.nbytes)
    return tuple(specs)


def specs_size(specs: Sequence[PieceSpec]) -> int:
    """Bytes of the packed buffer the specs describe."""
    return max((s.offset + _aligned(s.nbytes) for s in specs), default=0)


def pack_bucket(pieces: Sequence[TensorPiece], buffer: torch.Tensor) -> tuple[PieceSpec, ...]:
    """Copies the pieces into ``buffer`` (uint8, >= ``packed_size`` bytes, on the pieces' device)."""
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError(f"pack_bucket needs a flat uint8 buffer, got {buffer.dtype} with shape {tuple(buffer.shape)}")
    need = packed_size(pieces)
    if buffer.numel() < need:
        raise ValueError(f"pack_bucket: buffer of {buffer.numel()} bytes for {need} bytes of pieces")
    specs = piece_specs(pieces)
    for p, s in zip(pieces, specs):
        buffer[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape).copy_(p.tensor.detach())
    return specs


def unpack_bucket(buffer: torch.Tensor, specs: Sequence[PieceSpec]) -> list[TensorPiece]:
    """Copies each piece out of ``buffer`` (so the buffer may be reused as soon as this returns)."""
    pieces = []
    for s in specs:
        if s.offset < 0 or s.offset + s.nbytes > buffer.numel():
            raise ValueError(f"piece {s.name!r} at bytes {s.offset}:{s.offset + s.nbytes} lies outside the "
                             f"{buffer.numel()}-byte bucket")
        view = buffer[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
        pieces.append(TensorPiece(s.name, view.clone(), s.row_start, s.full_shape))
    return pieces


# ----------------------------------------------------------------------------------------------
# Staging (receiving side)
# ----------------------------------------------------------------------------------------------

class StagedWeights:
    """The pieces of one sync, reassembled into whole tensors."""

    def __init__(self, version: int):
        self.version = version
        self.num_buckets = 0
        self.nbytes = 0
        self._whole: dict[str, torch.Tensor] = {}
        self._split: dict[str, torch.Tensor] = {}
        self._rows_seen: dict[str, int] = {}

    def add(self, pieces: Sequence[TensorPiece]) -> None:
        for p in pieces:
            if p.is_whole:
                if p.name in self._whole or p.name in self._split:
                    raise ValueError(f"weight sync version {self.version}: tensor {p.name!r} sent twice")
                self._whole[p.name] = p.tensor
            else:
                self._add_rows(p)
            self.nbytes += p.nbytes
        self.num_buckets += 1

    def _add_rows(self, p: TensorPiece) -> None:
        if p.name in self._whole:
            raise ValueError(f"weight sync version {self.version}: tensor {p.name!r} sent twice")
        full = self._split.get(p.name)
        if full is None:
            full = self._split[p.name] = torch.empty(p.full_shape, dtype=p.tensor.dtype, device=p.tensor.device)
            self._rows_seen[p.name] = 0
        if tuple(full.shape) != p.full_shape or tuple(p.tensor.shape[1:]) != p.full_shape[1:]:
            raise ValueError(f"weight sync version {self.version}: pieces of {p.name!r} disagree on its shape")
        end = p.row_start + p.tensor.shape[0]
        if p.row_start < 0 or end > p.full_shape[0]:
            raise ValueError(f"weight sync version {self.version}: rows {p.row_start}:{end} of {p.name!r} "
                             f"are outside its {p.full_shape[0]} rows")
        full[p.row_start:end].copy_(p.tensor)
        self._rows_seen[p.name] += p.tensor.shape[0]

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """All tensors in arrival order; raises if a split tensor is missing rows (or got extra)."""
        for name, full in self._split.items():
            if self._rows_seen[name] != full.shape[0]:
                raise ValueError(f"weight sync version {self.version}: tensor {name!r} received "
                                 f"{self._rows_seen[name]} of {full.shape[0]} rows")
        return list(self._whole.items()) + list(self._split.items())
