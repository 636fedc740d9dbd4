"""The program f that Alice sends instead of the data, and its size |f| in bits.

f is a decoder: what Bob needs to turn the stream back into the data, and nothing else. That is
prequel's own decoding source (the model, the training step both sides run, the data plan, the
coder and the stream format) with only the optional modules the run's settings use (`FEATURES`:
the n-gram prior, a mixture, BPE, the shuffled and paced orders, portable kernels, KV-cache
steps), the pinned versions of the public packages it runs on, the resolved config, a trained
tokenizer, a content-dependent curriculum order, and the data length. Public
packages themselves (torch, lightning, ...) are named by version, not counted, as LTCB counts a
decompressor but not the operating system.

What decides *whether* to decode is not in f: the checks of a stream's header, of the config's
values and memory, and of the machine (tools/header.py, tools/config.py, tools/environment.py)
protect the person running it and change no decoded bit. Neither is Alice's side (tools/fit.py),
the reports (the code-length callback, tools/report.py) or the CLI. tests/test_program.py proves
the boundary: it decodes the fixture stream, and runs that use or leave out every optional module,
each with its f alone, as counted (comments and docstrings stripped), in a process where nothing
else of the project exists.

Each part is compressed on its own, with xz (lzma preset 9e) or bzip2 -9, whichever is smaller
(`packed_bits`), so the report can show what each costs.
"""

import ast
import bz2
import hashlib
import lzma
import tomllib
from pathlib import Path

from training.config import mixture_members

ROOT = Path(__file__).resolve().parents[1]
# f's modules: these folders, but for what only reports (tests/test_program.py checks that the
# decoder imports exactly these). Editing anything else neither changes |f| nor invalidates a stream.
F_PACKAGES = ("models", "training", "callbacks")
NOT_F = ("callbacks/code_length.py",)  # reports Σ beside decoding (Alice, verify); decoding needs none of it
PINS = "pyproject.toml"  # its [project] dependencies: the versions of the public packages Bob installs
# Modules only some runs need, each imported where its feature is used (never at the top of a module),
# and the settings that need it: a run's f is the other modules and those its settings ask for. A
# decoder missing one fails at the import, so tests/test_program.py proves each list complete.
FEATURES = {
    "models/kv_cache.py": lambda config: config.stream.procedure == "incremental",
    "models/mixture.py": lambda config: bool(mixture_members(config)),
    "models/ngram.py": lambda config: config.model.ngram_order > 0,
    "training/bpe.py": lambda config: config.data.tokenizer == "bpe",
    "training/orders.py": lambda config: config.data.curriculum in ("shuffle", "length_warmup", "difficulty"),
    "training/environment.py": lambda config: config.trainer.kernels == "portable",
}


def source_files(config=None) -> list[Path]:
    """f's files: every one (config None: what the code hash covers), or a run's (a training.config.Config)."""
    files = [p for pkg in F_PACKAGES for p in (ROOT / pkg).glob("*.py")
             if p.relative_to(ROOT).as_posix() not in NOT_F]
    if config is not None:
        files = [p for p in files if FEATURES.get(p.relative_to(ROOT).as_posix(), lambda _: True)(config)]
    return sorted(files, key=lambda p: p.relative_to(ROOT).as_posix())


def pins() -> bytes:
    """The dependency pins Bob installs, one per line (the rest of pyproject.toml is for developers)."""
    with open(ROOT / PINS, "rb") as f:
        return "\n".join(tomllib.load(f)["project"]["dependencies"]).encode()


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


def source_bundle(stripped: bool = False, config=None) -> bytes:
    """f's source as one deterministic byte string: per file its path, length and contents; then the
    pins. All of f's files, or (`config`) those a run with these settings needs."""
    parts = []
    for path in source_files(config):
        body = path.read_bytes()
        if stripped:
            body = strip_python(body.decode()).encode()
        parts.append(f"{path.relative_to(ROOT).as_posix()}\n{len(body)}\n".encode() + body)
    body = pins()
    parts.append(f"{PINS}\n{len(body)}\n".encode() + body)
    return b"".join(parts)


def code_hash() -> str:
    """Identifies the exact training code; the decoder refuses a stream from other code."""
    return hashlib.sha256(source_bundle()).hexdigest()


def xz_bits(data: bytes) -> int:
    if not data:
        return 0
    return 8 * len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]))


def packed_bits(data: bytes) -> int:
    """A part of f as sent: xz or bzip2, whichever is smaller, and one bit to say which (bzip2's
    Burrows-Wheeler sort wins on f's source, xz on short parts)."""
    if not data:
        return 0
    return 1 + min(xz_bits(data), 8 * len(bz2.compress(data, 9)))


def f_parts(config, config_yaml: str, tokenizer_blob: bytes, order_bits: int = 0) -> dict[str, int]:
    """|f| part by part, in bits, for a run with `config` (a training.config.Config; its counted
    settings are `config_yaml`). `order_bits`: a content-dependent curriculum order's cost (0 for
    orders the decoder rebuilds from config + seed; see training/curriculum.py)."""
    return {
        "source": packed_bits(source_bundle(stripped=True, config=config)),
        "config": packed_bits(config_yaml.encode()),
        "tokenizer": packed_bits(tokenizer_blob),
        "order": order_bits,
        "data_length": 64,  # the corpus length, as one 64-bit integer
    }
