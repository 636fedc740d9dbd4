"""The program f that Alice sends instead of the data, and its size |f| in bits.

Bob needs everything that is not a public, versioned dependency: prequel's own source (the
files that train), the resolved config, a trained tokenizer, a content-dependent curriculum
order, and the data length. Pinned packages (torch, lightning, ...) are named by version in
the stream header, not counted, as LTCB counts a decompressor but not the operating system.
Each part is compressed with xz (lzma preset 9e) on its own so the report can show what each
costs.
"""

import hashlib
import lzma
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_GLOBS = ("train.py", "pyproject.toml", "models/*.py", "training/*.py", "callbacks/*.py")


def source_files() -> list[Path]:
    files = {p for pattern in SOURCE_GLOBS for p in ROOT.glob(pattern)}
    return sorted(files, key=lambda p: p.relative_to(ROOT).as_posix())


def source_bundle() -> bytes:
    """The training source as one deterministic byte string: path, length, contents."""
    parts = []
    for path in source_files():
        body = path.read_bytes()
        parts.append(f"{path.relative_to(ROOT).as_posix()}\n{len(body)}\n".encode() + body)
    return b"".join(parts)


def code_hash() -> str:
    """Identifies the exact training code; the decoder refuses a stream from other code."""
    return hashlib.sha256(source_bundle()).hexdigest()


def xz_bits(data: bytes) -> int:
    if not data:
        return 0
    return 8 * len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]))


def program_bits(config_yaml: str, tokenizer_blob: bytes, order_bits: int = 0) -> dict[str, int]:
    """|f| part by part, in bits. `order_bits`: a content-dependent curriculum order's cost
    (0 for orders the decoder rebuilds from config + seed; see training/curriculum.py)."""
    return {
        "source": xz_bits(source_bundle()),
        "config": xz_bits(config_yaml.encode()),
        "tokenizer": xz_bits(tokenizer_blob),
        "order": order_bits,
        "data_length": 64,  # the corpus length, as one 64-bit integer
    }
