"""Checksums: SHA-256 of whole files (the manifest's) and HDF5's Fletcher-32 of chunks."""
from __future__ import annotations

import hashlib
import os
import sys

import numpy as np


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


_WORDS_PER_ROW = 1024
_ROWS_PER_BLOCK = 4096  # column sums of <= 4096 rows of 16-bit words fit in uint32


def fletcher32(data) -> int:
    """HDF5's Fletcher-32 (H5_checksum_fletcher32) of a bytes-like object, vectorised.

    HDF5 sums big-endian 16-bit words w_i (i < n): s1 = sum w_i and s2 = sum (n - i) w_i, both
    folded modulo 65535 (0 only for all-zero data, else in 1..65535). Swapping a word's two bytes
    multiplies it by 256 modulo 65535, so native little-endian words are summed and scaled by 256.
    Both sums come from one row-sum and one column-sum pass over a words x 1024 matrix."""
    raw = np.frombuffer(data, np.uint8)
    if len(raw) % 2:
        raw = np.concatenate([raw, np.zeros(1, np.uint8)])
    words = raw.view("<u2")
    n, total, weighted = len(words), 0, 0
    block = _WORDS_PER_ROW * _ROWS_PER_BLOCK
    for offset in range(0, n, block):
        part = words[offset:offset + block]
        rows = len(part) // _WORDS_PER_ROW
        head = part[:rows * _WORDS_PER_ROW].reshape(rows, _WORDS_PER_ROW)
        tail = part[rows * _WORDS_PER_ROW:].astype(np.uint64)
        row_sums = head.sum(axis=1, dtype=np.uint32).astype(np.uint64)
        col_sums = head.sum(axis=0, dtype=np.uint32).astype(np.uint64)
        part_total = int(col_sums.sum()) + int(tail.sum())
        local = (_WORDS_PER_ROW * int(np.arange(rows, dtype=np.uint64) @ row_sums)
                 + int(np.arange(_WORDS_PER_ROW, dtype=np.uint64) @ col_sums)
                 + int(np.arange(rows * _WORDS_PER_ROW, len(part), dtype=np.uint64) @ tail))
        total += part_total
        weighted += (n - offset) * part_total - local
    if sys.byteorder == "little":
        total, weighted = 256 * total, 256 * weighted
    if total == 0:
        return 0
    return ((weighted - 1) % 65535 + 1) << 16 | ((total - 1) % 65535 + 1)


def stored_fletcher_matches(data, stored: bytes) -> bool:
    """HDF5 accepts the checksum in either of its historical byte orders; so do we."""
    value = fletcher32(data)
    little = int.from_bytes(stored, "little")
    swapped = int.from_bytes(bytes((stored[1], stored[0], stored[3], stored[2])), "little")
    return value in (little, swapped)
