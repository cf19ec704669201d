"""Raw deflate for the npz writer and reader: ISA-L (python-isal) when installed, else zlib.

Both write streams any inflater reads (zipfile, numpy.load, DataComp's readers); only the bytes differ:
- ISA-L level 2: about 6x zlib's Huffman-only speed on float32 features and no larger (its matcher finds
  nothing to match in random mantissas and falls back to literals; on bf16-valued features, whose low
  bytes repeat, it is 7% smaller than Huffman-only). Its inflate and CRC-32 are faster too.
- zlib, Huffman coding only (`Z_HUFFMAN_ONLY`): as small as zlib's default level on float features, 3x
  faster than it, and what d2m wrote before ISA-L.
All of these release the GIL, so pieces of one member deflate in parallel threads.
"""

from __future__ import annotations

import zlib
from types import ModuleType

_isal: ModuleType | None
try:
    from isal import isal_zlib as _isal
except ImportError:  # an environment set up without it: zlib, Huffman only (the files stay valid)
    _isal = None

ISAL_LEVEL = 2  # ISA-L's default; level 1 is no faster here, 3 is much slower
BACKEND = "isal" if _isal is not None else "zlib"


def deflate_piece(data: memoryview | bytes, last: bool) -> bytes:
    """Raw deflate of one piece of a member. A piece ends byte-aligned (a sync flush) unless it is the
    member's last, so the pieces of a member concatenate into one stream."""
    flush_mode = zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH  # the same values in isal_zlib
    if _isal is not None:
        compressor = _isal.compressobj(ISAL_LEVEL, _isal.DEFLATED, -15, 9)
    else:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    return compressor.compress(data) + compressor.flush(flush_mode)


def inflate(data: memoryview | bytes, size: int) -> bytes:
    """A raw deflate stream, inflated in one call into `size` bytes (the output grows if it is longer).
    A corrupt stream raises zlib.error, whichever library inflated it."""
    if _isal is None:
        return zlib.decompress(data, -15, max(size, 1))
    try:
        return _isal.decompress(data, -15, max(size, 1))
    except _isal.error as err:
        raise zlib.error(str(err)) from err


def crc32(data: memoryview | bytes, value: int = 0) -> int:
    return _isal.crc32(data, value) if _isal is not None else zlib.crc32(data, value)
