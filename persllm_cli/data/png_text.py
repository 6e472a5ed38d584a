"""PNG text chunks, read and written with struct and zlib: where character cards live in a PNG.

A PNG is an 8-byte signature and then chunks: a 4-byte big-endian length, a 4-byte type, the data,
and a CRC-32 of type and data. A card is the data of a `tEXt` chunk: a Latin-1 keyword (`chara`
for V2, `ccv3` for V3), a NUL byte, then base64 text.

Written here rather than with Pillow because a card file is untrusted input: this reads only the
chunk headers and the text chunks (the pixels are never decoded), checks every length against
what is left of the file and against a limit *before* reading, checks the CRC of the text chunks,
and says in one sentence what is wrong. Pillow only draws the image of a card persllm exports.
"""

from __future__ import annotations

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PngError(ValueError):
    """A file that is not a PNG, or one whose chunks are broken; the message says which."""


def _chunks(png: bytes) -> list[tuple[int, int, bytes]]:
    """(start, end, type) of every chunk up to IEND, lengths checked against the file."""
    if not png.startswith(SIGNATURE):
        raise PngError("not a PNG file (no PNG signature)")
    out, pos = [], len(SIGNATURE)
    while True:
        if pos + 12 > len(png):
            raise PngError("the PNG ends in the middle of a chunk (a truncated file)")
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        end = pos + 12 + length
        if end > len(png):
            raise PngError(f"a {kind!r} chunk claims {length} bytes, more than the file holds (a truncated or corrupt file)")
        out.append((pos, end, kind))
        if kind == b"IEND":
            return out
        pos = end


def text_chunks(png: bytes, *, max_bytes: int) -> list[tuple[str, bytes]]:
    """The (keyword, text) of every tEXt chunk, in file order. A text chunk larger than
    `max_bytes` or with a wrong CRC is an error."""
    found = []
    for start, end, kind in _chunks(png):
        if kind != b"tEXt":
            continue
        length = end - start - 12
        if length > max_bytes:
            raise PngError(f"a text chunk of {length:,} bytes is larger than the {max_bytes:,} allowed")
        data = png[start + 8:end - 4]
        (crc,) = struct.unpack(">I", png[end - 4:end])
        if zlib.crc32(kind + data) != crc:
            raise PngError("a text chunk's checksum is wrong (a corrupt file)")
        keyword, sep, text = data.partition(b"\0")
        if not sep:
            raise PngError("a text chunk has no keyword separator (a corrupt file)")
        found.append((keyword.decode("latin-1"), text))
    return found


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def without_text(png: bytes, drop: tuple[str, ...]) -> bytes:
    """`png` without the text chunks whose keyword is in `drop` (any case), and without anything
    after IEND: the picture alone."""
    gone = {k.lower() for k in drop}
    parts = [SIGNATURE]
    for start, end, kind in _chunks(png):
        if kind == b"tEXt" and png[start + 8:end - 4].partition(b"\0")[0].decode("latin-1").lower() in gone:
            continue
        parts.append(png[start:end])
    return b"".join(parts)


def with_text(png: bytes, keyword: str, text: str, *, drop: tuple[str, ...] = ()) -> bytes:
    """`png` with a tEXt chunk `keyword` = `text` (Latin-1) just before IEND, where SillyTavern
    puts it, after removing the old text chunks named `keyword` or in `drop` (any case)."""
    png = without_text(png, (*drop, keyword))
    iend = _chunks(png)[-1][0]
    return png[:iend] + chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1")) + png[iend:]
