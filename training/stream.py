"""The stream file: what Bob receives besides the pinned packages.

Layout (little-endian):

    b"PRQLSTRM"  u16 version
    u32 header length,  header (JSON),  u32 crc32      what the decoder needs + what changes bits
    u32 segment count, then per segment:               the arithmetic-coded tokens
        u64 batches, u64 word count, u32 words...
    u32 crc32 of the segment section
    u32 trailer length, trailer (JSON), u32 crc32       checks only: token/parameter checksums,
                                                        data sha256, final weights hash

The header is the program f (its parts are counted in |f|); the payload words are the Σ part.
A new segment starts at every training checkpoint, so a resumed run continues the stream
exactly where its checkpoint sealed it (each seal costs at most a few dozen bits of padding;
its 16 bytes of framing are reported apart from the payload). The trailer is not needed to
decode and only turns silent drift into a named error. Every length is checked against the
bytes that remain before anything is allocated, so a forged or truncated file fails fast with
`StreamError`.
"""

import json
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"PRQLSTRM"
VERSION = 1
MAX_JSON_BYTES = 64 << 20  # no header or trailer is this large; a bigger length is corrupt


class StreamError(ValueError):
    """The stream cannot be decoded as is; the message says why."""


@dataclass
class Segment:
    batches: int  # training batches coded in this segment
    words: np.ndarray  # uint32, a sealed range-coder stream


@dataclass
class Stream:
    header: dict
    segments: list[Segment]
    trailer: dict

    @property
    def payload_bits(self) -> int:
        return 32 * sum(len(s.words) for s in self.segments)


def _json_section(obj: dict) -> bytes:
    body = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return struct.pack("<I", len(body)) + body + struct.pack("<I", zlib.crc32(body))


def encode_stream(stream: Stream) -> bytes:
    payload = [struct.pack("<I", len(stream.segments))]
    for seg in stream.segments:
        payload.append(struct.pack("<QQ", seg.batches, len(seg.words)))
        payload.append(np.ascontiguousarray(seg.words, dtype="<u4").tobytes())
    payload = b"".join(payload)
    return b"".join([
        MAGIC, struct.pack("<H", VERSION), _json_section(stream.header),
        payload, struct.pack("<I", zlib.crc32(payload)), _json_section(stream.trailer),
    ])


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file + fsync + rename: a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_stream(path: Path, stream: Stream) -> int:
    data = encode_stream(stream)
    write_atomic(path, data)
    return len(data)


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise StreamError(f"stream truncated: {what} needs {n} bytes but only {len(self.data) - self.pos} remain")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def json_section(self, what: str) -> dict:
        n = self.unpack("<I", f"{what} length")
        if n > MAX_JSON_BYTES:
            raise StreamError(f"{what} corrupted: claims {n} bytes (limit {MAX_JSON_BYTES})")
        body = self.take(n, what)
        if zlib.crc32(body) != self.unpack("<I", f"{what} checksum"):
            raise StreamError(f"{what} corrupted: crc32 mismatch")
        try:
            obj = json.loads(body)
        except ValueError:
            raise StreamError(f"{what} corrupted: not valid JSON") from None
        if not isinstance(obj, dict):
            raise StreamError(f"{what} corrupted: not a JSON object")
        return obj


def decode_stream(data: bytes) -> Stream:
    r = _Reader(data)
    if r.take(len(MAGIC), "magic") != MAGIC:
        raise StreamError("not a prequel stream (bad magic bytes)")
    version = r.unpack("<H", "version")
    if version != VERSION:
        raise StreamError(f"stream format version {version}; this prequel reads version {VERSION}")
    header = r.json_section("header")
    start = r.pos
    segments = []
    for _ in range(r.unpack("<I", "segment count")):
        batches, n_words = r.unpack("<Q", "segment batches"), r.unpack("<Q", "segment length")
        words = r.take(4 * n_words, "payload") if n_words <= len(data) // 4 else r.take(len(data) + 1, "payload")
        segments.append(Segment(batches, np.frombuffer(words, dtype="<u4").astype(np.uint32)))
    if zlib.crc32(data[start : r.pos]) != r.unpack("<I", "payload checksum"):
        raise StreamError("payload corrupted: crc32 mismatch")
    trailer = r.json_section("trailer")
    if r.pos != len(data):
        raise StreamError(f"stream corrupted: {len(data) - r.pos} unexpected bytes after the trailer")
    return Stream(header, segments, trailer)


def read_stream(path: Path) -> Stream:
    path = Path(path)
    if not path.is_file():
        raise StreamError(f"no stream file at {path}")
    return decode_stream(path.read_bytes())
