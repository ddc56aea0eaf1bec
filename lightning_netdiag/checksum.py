"""CRC32C (Castagnoli), the checksum that frames every TensorBoard record, computed a block of bytes at a time.

TensorBoard's writer checksums each record in pure Python, a byte at a time, on its writer thread and holding the
GIL: about 0.2 ms per kB on a 2-core CPU, which the training thread waits for (a small model's logging step writes
17 kB). The same checksum here costs about one table look-up per byte in numpy, plus a few Python operations per
block of :data:`BLOCK` bytes.

How: a CRC is linear over GF(2). With ``F`` the register's advance over one zero byte and ``T`` the byte table,
a message ``b_0 .. b_{n-1}`` leaves ``F^n(init) ^ XOR_i F^(n-1-i)(T[b_i])`` in the register. Each byte's term is
read from a table of its position within its block (:data:`BLOCK` x 256 entries), the terms of a block are XORed
together in numpy, and the blocks are then chained, a shift of :data:`BLOCK` zero bytes each (four look-ups).
The initial ``0xFFFFFFFF`` is the first four bytes inverted with a zero register.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["BLOCK", "crc32c", "mask", "masked_crc32c"]

_POLY = 0x82F63B78  # Castagnoli's polynomial, bit-reversed
#: Bytes per block: the tables take BLOCK x 1 kB.
BLOCK = 256
#: Shorter messages (a record's 8-byte header) are checksummed a byte at a time: numpy's calls cost more there.
_SHORT = 64


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1).astype(np.uint32)
    return table


_T = _byte_table()
_T_LIST = [int(v) for v in _T]


def _advance(values: np.ndarray, zeros: int) -> np.ndarray:
    """The register ``values`` after ``zeros`` zero bytes."""
    for _ in range(zeros):
        values = _T[values & 0xFF] ^ (values >> 8)
    return values


@functools.cache
def _block_tables() -> tuple[np.ndarray, list[list[int]]]:
    """``in_block[k, b]``: the term of byte ``b`` at place ``k`` of a block, as it stands at the block's end; and the
    shift over a block of zero bytes as four tables, one per byte of the register. Made at the first long message
    (a few ms), not when a module that may checksum is imported."""
    in_block = np.empty((BLOCK, 256), dtype=np.uint32)
    in_block[BLOCK - 1] = _T
    for k in range(BLOCK - 2, -1, -1):
        in_block[k] = _advance(in_block[k + 1], 1)
    shift = [[int(v) for v in _advance(np.arange(256, dtype=np.uint32) << (8 * j), BLOCK)] for j in range(4)]
    return in_block, shift


def crc32c(data: bytes) -> int:
    """The CRC32C of ``data``: equal to ``google_crc32c.value(data)`` and to TensorBoard's own."""
    n = len(data)
    if n < _SHORT:
        crc = 0xFFFFFFFF
        for b in data:
            crc = _T_LIST[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF
    # leading zeros change nothing with a zero register: the message fills whole blocks
    padded = np.zeros(n + (-n) % BLOCK, dtype=np.uint8)
    padded[-n:] = np.frombuffer(data, dtype=np.uint8)
    padded[-n : -n + 4] ^= 0xFF  # the initial register, as the first four bytes inverted
    in_block, (s0, s1, s2, s3) = _block_tables()
    blocks = np.bitwise_xor.reduce(in_block[np.arange(BLOCK), padded.reshape(-1, BLOCK)], axis=1)
    crc = 0
    for term in blocks.tolist():
        crc = s0[crc & 0xFF] ^ s1[(crc >> 8) & 0xFF] ^ s2[(crc >> 16) & 0xFF] ^ s3[crc >> 24] ^ term
    return crc ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    """A CRC32C masked as TensorBoard (and TFRecord) frames a record with it."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The masked CRC32C of ``data`` (:func:`mask`): TensorBoard's ``masked_crc32c``."""
    return mask(crc32c(data))
