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
values and memory, and of the machine (prequel/checks/)
protect the person running it and change no decoded bit. Neither is Alice's side (prequel/alice/fit.py),
the reports (the code-length callback, prequel/reports/summary.py) or the CLI. tests/test_program.py proves
the boundary: it decodes the fixture stream, and runs that use or leave out every optional module,
each with its f alone, as counted (comments and docstrings stripped), in a process where nothing
else of the project exists.

Each part is compressed on its own, with xz (lzma preset 9e) or bzip2 -9, whichever is smaller
(`packed_bits`), so the report can show what each costs.
"""

import ast
import bz2
import hashlib
import importlib
import lzma
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

from prequel.training.config import mixture_members

DISTRIBUTION = "prequel"
# f's modules: every module of these subpackages of `prequel` (and prequel/__init__.py, which each
# of them imports), but for what only reports or checks. tests/test_program.py proves that the decoder
# imports exactly these. Editing anything else neither changes |f| nor invalidates a stream.
F_PACKAGES = ("models", "training", "callbacks")
NOT_F = ("callbacks/code_length.py", "callbacks/contract.py")  # Σ beside decoding; the callbacks' contract
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
    "training/fixed_gemm.py": lambda config: config.trainer.kernels == "portable",
}


def source_files(config=None) -> dict[str, Path]:
    """f's files, each under its name inside the package (``models/gpt.py``): every one (config
    None: what the code hash covers), or those a run with these settings needs (a training.config.Config).
    Read from wherever `prequel` is imported from: an installed package, or a checkout."""
    package = Path(importlib.import_module(DISTRIBUTION).__file__).parent
    files = {"__init__.py": package / "__init__.py"}
    for name in F_PACKAGES:
        folder = Path(importlib.import_module(f"{DISTRIBUTION}.{name}").__path__[0])
        files |= {f"{name}/{p.name}": p for p in folder.glob("*.py") if f"{name}/{p.name}" not in NOT_F}
    if config is not None:
        files = {name: p for name, p in files.items() if FEATURES.get(name, lambda _: True)(config)}
    return dict(sorted(files.items()))


def pins() -> bytes:
    """The dependency pins Bob installs, one per line, as the installed package's metadata states
    them (pyproject.toml's [project] dependencies; its extras are for developers)."""
    try:
        required = requires(DISTRIBUTION) or []
    except PackageNotFoundError:
        raise RuntimeError(
            "prequel is not installed (pip install .): its dependency pins, part of f, "
            "are read from the installed package's metadata"
        ) from None
    return "\n".join(r for r in required if "extra ==" not in r).encode()


def strip_python(source: str) -> str:
    """The same program without comments and docstrings (an AST round trip): what Bob needs
    to run, so what |f| counts and the code hash covers. Readers get the commented original; it
    behaves identically, and a comment or a reformatting changes neither."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def source_bundle(config=None) -> bytes:
    """f's source as Bob runs it, as one deterministic byte string: per file its path in the
    installed package, its length and its stripped source; then the pins. All of f's files, or
    (`config`) those a run with these settings needs."""
    parts = []
    for name, path in source_files(config).items():
        body = strip_python(path.read_text(encoding="utf-8")).encode()
        parts.append(f"{DISTRIBUTION}/{name}\n{len(body)}\n".encode() + body)
    body = pins()
    parts.append(f"pins\n{len(body)}\n".encode() + body)
    return b"".join(parts)


def code_hash() -> str:
    """Identifies the exact training code, as |f| counts it; the decoder refuses a stream from other code."""
    return hashlib.sha256(source_bundle()).hexdigest()


def xz_bits(data: bytes) -> int:
    if not data:
        return 0
    return 8 * len(
        lzma.compress(
            data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
        )
    )


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
        "source": packed_bits(source_bundle(config)),
        "config": packed_bits(config_yaml.encode()),
        "tokenizer": packed_bits(tokenizer_blob),
        "order": order_bits,
        "data_length": 64,  # the corpus length, as one 64-bit integer
    }
