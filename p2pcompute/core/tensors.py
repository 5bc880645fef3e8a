"""Content-addressed tensors: the metadata that names a tensor, and the digests (specs/job-format.md §Tensors).

A tensor travels as its raw bytes: little-endian, C-contiguous, ``prod(shape) * itemsize`` bytes of one
of the dtypes in :data:`DTYPES`. It is named by the SHA-256 of those bytes; the :class:`TensorMeta` that
names it also states its dtype and shape, so a receiver checks length, dtype and hash before it builds
anything from the bytes. Pure: no torch here (``compute/`` maps dtype names to torch dtypes).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

from p2pcompute.core import codec
from p2pcompute.core.schema import OneOf, Range, Size, Struct, to_wire
from p2pcompute.errors import JobFormatError, Reason

__all__ = [
    "DIGEST_SIZE",
    "DTYPES",
    "Digest",
    "MAX_DIMS",
    "TensorMeta",
    "check_blob",
    "outputs_digest",
    "tensor_digest",
]

DIGEST_SIZE = 32
MAX_DIMS = 8
MAX_DIM = 1 << 40

DTYPES: dict[str, int] = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "bool": 1,
}
"""The dtypes a tensor may have on the wire, with their item sizes in bytes."""

Digest = Annotated[bytes, Size(DIGEST_SIZE, DIGEST_SIZE)]

_OUTPUTS_DOMAIN = b"p2pcompute/outputs/v1\x00"


@dataclass(frozen=True, kw_only=True)
class TensorMeta(Struct):
    """What names a tensor: the SHA-256 of its raw bytes, its dtype and its shape.

    ``dtype`` is one of :data:`DTYPES`: decoding refuses any other name with ``bad_dtype`` (a :class:`SchemaError`
    inside a message or evidence, a :class:`JobFormatError` in a job spec), and so does encoding
    (:class:`LocalProtocolError`). A meta built locally with another name is refused by :attr:`nbytes`.
    """

    digest: Digest
    dtype: Annotated[str, Size(1, 16), OneOf(DTYPES, Reason.BAD_DTYPE)]
    shape: Annotated[tuple[Annotated[int, Range(0, MAX_DIM)], ...], Size(0, MAX_DIMS)]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Byte length of the tensor's raw data; raises :class:`JobFormatError` for an unknown dtype."""
        itemsize = DTYPES.get(self.dtype)
        if itemsize is None:
            raise JobFormatError(Reason.BAD_DTYPE, f"dtype {self.dtype[:16]!r} is not one of {sorted(DTYPES)}")
        return self.numel * itemsize


def tensor_digest(data: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 of a tensor's raw bytes: its content address."""
    return hashlib.sha256(data).digest()


def check_blob(meta: TensorMeta, data: bytes | bytearray | memoryview) -> None:
    """Check that ``data`` is the tensor ``meta`` names: dtype known, length right, hash right.

    Raises :class:`JobFormatError` with ``bad_dtype``, ``shape_mismatch`` or ``hash_mismatch``.
    """
    expected = meta.nbytes
    if len(data) != expected:
        raise JobFormatError(
            Reason.SHAPE_MISMATCH,
            f"tensor {meta.digest.hex()[:16]}: {len(data)} bytes, {meta.dtype}{list(meta.shape)} needs {expected}",
        )
    if tensor_digest(data) != meta.digest:
        raise JobFormatError(Reason.HASH_MISMATCH, f"tensor bytes do not hash to {meta.digest.hex()[:16]}")


def outputs_digest(outputs: Iterable[TensorMeta]) -> bytes:
    """The digest a worker attests for a job's outputs: SHA-256 over the domain and the canonical metas in order."""
    return hashlib.sha256(_OUTPUTS_DOMAIN + codec.pack([to_wire(meta) for meta in outputs])).digest()
