"""The stream file: what Bob receives besides the pinned packages.

Layout (little-endian):

    b"PRQLSTRM"  u16 version
    u32 header length,  header (JSON),  u32 crc32      what the decoder needs + what changes bits
    u32 segment count, then per segment:               the rANS-coded tokens (training/coding.py)
        u64 batches, u32 lanes, u64 word count, u16 words...   (the lanes' final states first)
    u32 crc32 of the segment section
    u32 trailer length, trailer (JSON), u32 crc32       checks only: token/parameter checksums,
                                                        data sha256, final weights hash

The header is the program f (its parts are counted in |f|); the payload words are the Σ part.
A new segment starts at every training checkpoint, so a resumed run continues the stream
exactly where its checkpoint sealed it (each seal costs a lane's 64-bit final state per lane,
`Stream.padding_bits`; its 20 bytes of framing are reported apart from the payload). The trailer is not needed to
decode and only turns silent drift into a named error. Every length is checked against the
bytes that remain before anything is allocated, so a forged or truncated file fails fast with
`StreamError`: the segment table is scanned and its crc checked before any word array is
built, and a file without the magic bytes is refused after reading its first ten bytes.
`encode_stream` writes the layout (Alice writes the file: prequel/alice/encoder.py `write_stream`).
"""

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"PRQLSTRM"
VERSION = 2
LAST_COMMIT = {1: "50e249a"}  # the last commit that reads each earlier version
MAX_JSON_BYTES = 64 << 20  # no header or trailer is this large; a bigger length is corrupt
_SEGMENT_FRAMING = 20  # u64 batches + u32 lanes + u64 word count


class StreamError(ValueError):
    """The stream cannot be decoded as is; the message says why."""


@dataclass
class Segment:
    batches: int  # training batches coded in this segment
    lanes: int  # rANS lanes: row r of a batch codes on lane r
    words: np.ndarray  # uint16: the lanes' final states (four words each), then the rest


@dataclass
class Stream:
    header: dict
    segments: list[Segment]
    trailer: dict

    @property
    def payload_bits(self) -> int:
        return 16 * sum(len(s.words) for s in self.segments)

    @property
    def padding_bits(self) -> int:
        """What sealing costs at most: every lane's final state, 64 bits, in every segment."""
        return 64 * sum(s.lanes for s in self.segments)


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
        except (ValueError, RecursionError):  # RecursionError: a forged, absurdly nested document
            raise StreamError(f"{what} corrupted: not valid JSON") from None
        if not isinstance(obj, dict):
            raise StreamError(f"{what} corrupted: not a JSON object")
        return obj


def _json_section(obj: dict) -> bytes:
    body = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return struct.pack("<I", len(body)) + body + struct.pack("<I", zlib.crc32(body))


def encode_stream(stream: Stream) -> bytes:
    """The file's bytes: the layout above, which `decode_stream` reads back."""
    payload = [struct.pack("<I", len(stream.segments))]
    for seg in stream.segments:
        payload.append(struct.pack("<QIQ", seg.batches, seg.lanes, len(seg.words)))
        payload.append(np.ascontiguousarray(seg.words, dtype="<u2").tobytes())
    payload = b"".join(payload)
    return b"".join(
        [
            MAGIC,
            struct.pack("<H", VERSION),
            _json_section(stream.header),
            payload,
            struct.pack("<I", zlib.crc32(payload)),
            _json_section(stream.trailer),
        ]
    )


def decode_stream(data: bytes) -> Stream:
    """Parse a stream file's bytes; anything malformed raises `StreamError`, nothing else."""
    r = _Reader(bytes(data))
    _check_magic(r)
    header = r.json_section("header")
    start = r.pos
    # Scan the segment table first (offsets only), check its crc, then build the word arrays:
    # a forged count or length costs neither memory nor time beyond the file's own size.
    count = r.unpack("<I", "segment count")
    if count * _SEGMENT_FRAMING > len(r.data) - r.pos:
        raise StreamError(
            f"stream corrupted: {count:,} segments cannot fit in the {len(r.data) - r.pos:,} bytes that remain"
        )
    table = []
    for i in range(count):
        batches, lanes = r.unpack("<Q", f"segment {i} batches"), r.unpack("<I", f"segment {i} lanes")
        n_words = r.unpack("<Q", f"segment {i} length")
        if batches == 0 or lanes == 0 or n_words < 4 * lanes:
            raise StreamError(
                f"stream corrupted: segment {i} codes {batches} batches on {lanes} lanes in {n_words} words "
                "(batches and lanes must be > 0, and every lane's state takes four words)"
            )
        if n_words > (len(r.data) - r.pos) // 2:
            raise StreamError(
                f"stream truncated: segment {i} claims {n_words:,} words but only {len(r.data) - r.pos:,} bytes remain"
            )
        table.append((batches, lanes, r.pos, n_words))
        r.pos += 2 * n_words
    if zlib.crc32(memoryview(r.data)[start : r.pos]) != r.unpack("<I", "payload checksum"):
        raise StreamError("payload corrupted: crc32 mismatch")
    trailer = r.json_section("trailer")
    if r.pos != len(r.data):
        raise StreamError(f"stream corrupted: {len(r.data) - r.pos} unexpected bytes after the trailer")
    segments = [
        Segment(batches, lanes, np.frombuffer(r.data, dtype="<u2", count=n, offset=at).astype(np.uint16))
        for batches, lanes, at, n in table
    ]
    return Stream(header, segments, trailer)


def _check_magic(r: _Reader) -> None:
    if r.take(len(MAGIC), "magic") != MAGIC:
        raise StreamError("not a prequel stream (bad magic bytes)")
    version = r.unpack("<H", "version")
    if version in LAST_COMMIT:
        raise StreamError(
            f"stream format version {version}, which this prequel no longer reads (version {VERSION}: "
            f"another coder); commit {LAST_COMMIT[version]} is the last that verifies it"
        )
    if version != VERSION:
        raise StreamError(f"stream format version {version}; this prequel reads version {VERSION}")


def read_stream(path: Path) -> Stream:
    path = Path(path)
    if not path.is_file():
        raise StreamError(f"no stream file at {path}")
    try:
        with open(path, "rb") as f:
            _check_magic(_Reader(f.read(len(MAGIC) + 2)))  # refuse a wrong (maybe huge) file unread
            f.seek(0)
            data = f.read()
    except OSError as e:
        raise StreamError(f"cannot read the stream {path}: {e.strerror}") from None
    return decode_stream(data)
