"""The checks of a stream's header, and the header of a file compressed with a frozen model.

A training stream's header (training/header.py `TrainingHeader`, part of f) is read back with
`checked_header`, the one place a header read from a file is checked. The checksums only catch accidents,
so a forged header with valid checksums must still fail here, naming the field, before the reader
allocates or decodes anything: `StreamError("header corrupted: <field>: <what is wrong>")`. Every
number that sizes memory (the settings, data_tokens, the order, a compressed file's token count) is
also held to the memory limit (prequel/checks/memory.py), so a header that is well-formed but
asks for more than this machine allows is refused, named, before decoding. These checks decide
whether Bob decodes, not what he decodes: outside f.

`CompressHeader`: a file compressed with a frozen model (prequel/compress/codec.py, kind "compress").

torch is imported only inside the functions that parse the config and the order (and check
sizes), so reading a header's fields needs neither torch nor the model code.
"""

from dataclasses import dataclass, replace
from typing import Any

from prequel.training.header import TrainingHeader
from prequel.training.stream import StreamError

MAX_COUNT = 2**48  # no token or byte count is this large; a larger one is corrupt, not a big file
COMPRESS_KIND = "compress"


def _corrupted(field: str, what: str) -> StreamError:
    return StreamError(f"header corrupted: {field}: {what}")


def _field(d: dict, key: str, kind: type, what: str, path: str = "") -> Any:
    """d[key], of exactly `kind` (a bool is not a count, an int is not a string); `path` names
    it in the error when it is nested ("tokenizer: blob")."""
    path = path or key
    if key not in d:
        raise _corrupted(path, "missing")
    value = d[key]
    if type(value) is not kind:
        raise _corrupted(path, f"must be {what}, got {value!r:.80}")
    return value


def _count(d: dict, key: str, low: int) -> int:
    value = _field(d, key, int, "an integer")
    if not low <= value < MAX_COUNT:
        raise _corrupted(key, f"must be in {low}..2**48 - 1, got {value}")
    return value


def _sha256(d: dict, key: str, path: str = "") -> str:
    value = _field(d, key, str, "a sha256 hex digest", path)
    if len(value) != 64 or not set(value) <= set("0123456789abcdef"):
        raise _corrupted(path or key, f"must be a sha256 hex digest, got {value!r:.80}")
    return value


def _hex(d: dict, key: str, path: str) -> bytes:
    text = _field(d, key, str, "a hex string", path)
    try:
        return bytes.fromhex(text)
    except ValueError as e:
        raise _corrupted(path, f"not hex: {e}") from None


def _check_threads(environment: dict) -> None:
    """The recorded thread count is used to set torch's (decompress): bounded as the setting is."""
    from prequel.checks.settings import MAX_THREADS

    threads = environment.get("num_threads")
    if threads is not None and (type(threads) is not int or not 1 <= threads <= MAX_THREADS):
        raise _corrupted("environment: num_threads", f"must be an integer in 1..{MAX_THREADS}, got {threads!r:.80}")


def checked_header(d: dict) -> TrainingHeader:
    """A training stream's header with every field checked, the settings and the order parsed;
    the tokenizer blob's content is checked where it is parsed, by `checked_tokenizer`."""
    if not isinstance(d, dict):
        raise StreamError("header corrupted: not a JSON object")
    config = _field(d, "config", dict, "a JSON object")
    n_tokens = d.get("data_tokens")
    if type(n_tokens) is not int or not 0 < n_tokens < MAX_COUNT:
        raise StreamError(f"header corrupted: data_tokens must be a count of tokens, got {n_tokens!r:.80}")
    tokenizer_, environment = d.get("tokenizer"), d.get("environment")
    if not isinstance(environment, dict) or not isinstance(tokenizer_, dict):
        raise StreamError("header corrupted: environment and tokenizer must be JSON objects")
    header = TrainingHeader(
        config=config,
        tokenizer_name=_field(tokenizer_, "name", str, "a string", "tokenizer: name"),
        tokenizer_blob=_hex(tokenizer_, "blob", "tokenizer: blob"),
        data_tokens=n_tokens,
        code_hash=_sha256(d, "code_hash"),
        environment=environment,
        precision=_field(d, "precision", str, "a string"),
        compile=_field(d, "compile", bool, "true or false"),
        order=_field(d, "order", str, "a base64 string") if "order" in d else None,
    )
    _check_threads(environment)
    # Parsing is the check, in this order: the settings and data_tokens are held to the memory
    # limit before the order, whose size they fix, is decompressed.
    settings, levels = checked_settings(header), checked_order(header)
    if settings.data.curriculum == "difficulty" and levels is None:
        raise StreamError("header corrupted: a difficulty order needs its transmitted levels (header['order'])")
    return header


def checked_settings(header: TrainingHeader, vocab_size: int | None = None):
    """The run's settings (a `training.config.Config`), every value checked and held with
    data_tokens to the memory limit; `vocab_size`: the tokenizer's, when it is known (see `checked_tokenizer`)."""
    from prequel.checks.memory import MemoryLimitError, check_memory, max_memory_bytes
    from prequel.checks.settings import config_from_dict

    limit = max_memory_bytes()  # (a bad $PREQUEL_MAX_MEMORY_GB is the user's ConfigError, not the header's)
    try:
        config = config_from_dict(header.config)
        if vocab_size is not None:
            config = replace(config, data=replace(config.data, vocab_size=vocab_size))
        check_memory(config, header.data_tokens, limit)
    except MemoryLimitError as e:  # well-formed, maybe real: too big for this machine (or forged)
        claim = (
            f"the header claims {header.data_tokens:,} tokens: more than this machine can hold"
            if e.key == "data_tokens"
            else "the stream's header asks for more memory than allowed"
        )
        raise StreamError(f"{claim}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:  # ConfigError names the dotted key
        raise StreamError(f"header corrupted: {e}") from None
    check_tape_disk(header.data_tokens, vocab_size or config.data.vocab_size)
    return config


def check_tape_disk(data_tokens: int, vocab_size: int) -> None:
    """Bob decodes onto shard files in the temp directory (training/tokens.py): refuse a token
    count their disk cannot hold, before a file is made."""
    import shutil
    import tempfile

    from prequel.checks.memory import format_bytes
    from prequel.training.tokens import dtype_for

    directory = tempfile.gettempdir()
    need, free = data_tokens * dtype_for(max(vocab_size, 256)).itemsize, shutil.disk_usage(directory).free
    if need > free:
        raise StreamError(
            f"the header claims {data_tokens:,} tokens: more than this machine can hold: decoding them "
            f"needs {format_bytes(need)} of disk in {directory}, which has {format_bytes(free)} free "
            "(set TMPDIR to a larger disk)"
        )


def checked_order(header: TrainingHeader):
    """The transmitted curriculum order, checked: decompressed only up to the
    ceil(data_tokens / block_size) levels the header's sizes allow."""
    config = checked_settings(header)
    if header.order is None:
        return None
    if config.data.curriculum != "difficulty":
        raise _corrupted(
            "order",
            f"the {config.data.curriculum} curriculum transmits no order (only data.curriculum: difficulty does)",
        )
    try:
        return header.labels()
    except (TypeError, ValueError) as e:
        raise _corrupted("order", str(e)) from None


def checked_tokenizer(header: TrainingHeader):
    """The tokenizer, its blob's content checked where it is parsed, and the settings held to the
    memory limit again with its real vocabulary size."""
    try:
        parsed = header.tokenizer()
    except (KeyError, TypeError, ValueError) as e:  # (TokenizerError is a ValueError)
        raise _corrupted("tokenizer", str(e)) from None
    checked_settings(header, vocab_size=parsed.vocab_size)
    return parsed


@dataclass(frozen=True)
class CompressHeader:
    format: int  # prequel.compress.codec.FORMAT: bumped when the coding procedure changes bits
    original_bytes: int
    tokens: int
    chunk_size: int  # tokens per chunk, each coded from a fresh BOS context
    batch_chunks: int  # chunks coded at once (fixes the shapes, hence the bits)
    top_k: int  # 0 = off
    model_checkpoint: str  # the checkpoint's file name, for the error message when it is the wrong one
    model_sha256: str  # the architecture and the parameters' bits (prequel.compress.frozen.FrozenModel.model_sha256)
    tokenizer_name: str
    tokenizer_sha256: str
    environment: dict  # the facts that change bits, checked as for a training stream
    dtype: str  # the parameters' and logits' dtype
    kind: str = COMPRESS_KIND  # what tells a compressed file from a training stream

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "format": self.format,
            "original_bytes": self.original_bytes,
            "tokens": self.tokens,
            "chunk_size": self.chunk_size,
            "batch_chunks": self.batch_chunks,
            "top_k": self.top_k,
            "model": {"checkpoint": self.model_checkpoint, "sha256": self.model_sha256},
            "tokenizer": {"name": self.tokenizer_name, "sha256": self.tokenizer_sha256},
            "environment": self.environment,
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CompressHeader":
        """Every field checked; which format, model and tokenizer fit is for the reader to say."""
        if not isinstance(d, dict):
            raise StreamError("header corrupted: not a JSON object")
        if d.get("kind") != COMPRESS_KIND:
            raise StreamError("not a compressed file (a training stream? use prequel verify)")
        model = _field(d, "model", dict, "a JSON object")
        tokenizer = _field(d, "tokenizer", dict, "a JSON object")
        environment = _field(d, "environment", dict, "a JSON object")
        _check_threads(environment)
        from prequel.checks.memory import check_token_memory

        check_token_memory(_count(d, "tokens", 0))
        return cls(
            format=_count(d, "format", 1),
            original_bytes=_count(d, "original_bytes", 0),
            tokens=_count(d, "tokens", 0),
            chunk_size=_count(d, "chunk_size", 1),
            batch_chunks=_count(d, "batch_chunks", 1),
            top_k=_count(d, "top_k", 0),
            model_checkpoint=_field(model, "checkpoint", str, "a file name", "model: checkpoint"),
            model_sha256=_sha256(model, "sha256", "model: sha256"),
            tokenizer_name=_field(tokenizer, "name", str, "a string", "tokenizer: name"),
            tokenizer_sha256=_sha256(tokenizer, "sha256", "tokenizer: sha256"),
            environment=environment,
            dtype=_field(d, "dtype", str, "a string"),
        )
