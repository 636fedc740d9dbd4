"""The program f that Alice sends instead of the data, and its size |f| in bits.

Bob needs everything that is not a public, versioned dependency: prequel's own source (the
files that train), the resolved config, a trained tokenizer, a content-dependent curriculum
order, and the data length. Pinned packages (torch, lightning, ...) are named by version in
the stream header, not counted, as LTCB counts a decompressor but not the operating system.
Each part is compressed with xz (lzma preset 9e) on its own so the report can show what each
costs. The source is counted without comments and docstrings (see `strip_python`).
"""

import ast
import hashlib
import lzma
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# f is these folders, whole: exactly the modules Bob imports to decode (tests/test_program.py
# checks that the decoder imports all of them and nothing else of the project). The CLI
# (train.py) and tools/ (reports, the size sweep, the frozen-model compressor) are outside:
# editing them neither changes |f| nor invalidates a stream.
F_PACKAGES = ("models", "training", "callbacks")
F_FILES = ("pyproject.toml",)  # the pinned versions of the public packages Bob installs


def source_files() -> list[Path]:
    files = [ROOT / name for name in F_FILES] + [p for pkg in F_PACKAGES for p in (ROOT / pkg).glob("*.py")]
    return sorted(files, key=lambda p: p.relative_to(ROOT).as_posix())


def strip_python(source: str) -> str:
    """The same program without comments and docstrings (an AST round trip): what Bob needs
    to run, so what |f| counts. Readers get the commented original; it behaves identically."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def source_bundle(stripped: bool = False) -> bytes:
    """The training source as one deterministic byte string: path, length, contents."""
    parts = []
    for path in source_files():
        body = path.read_bytes()
        if stripped and path.suffix == ".py":
            body = strip_python(body.decode()).encode()
        parts.append(f"{path.relative_to(ROOT).as_posix()}\n{len(body)}\n".encode() + body)
    return b"".join(parts)


def code_hash() -> str:
    """Identifies the exact training code; the decoder refuses a stream from other code."""
    return hashlib.sha256(source_bundle()).hexdigest()


def xz_bits(data: bytes) -> int:
    if not data:
        return 0
    return 8 * len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]))


def f_parts(config_yaml: str, tokenizer_blob: bytes, order_bits: int = 0) -> dict[str, int]:
    """|f| part by part, in bits. `order_bits`: a content-dependent curriculum order's cost
    (0 for orders the decoder rebuilds from config + seed; see training/curriculum.py)."""
    return {
        "source": xz_bits(source_bundle(stripped=True)),
        "config": xz_bits(config_yaml.encode()),
        "tokenizer": xz_bits(tokenizer_blob),
        "order": order_bits,
        "data_length": 64,  # the corpus length, as one 64-bit integer
    }
