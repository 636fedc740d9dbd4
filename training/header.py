"""The stream headers, typed: what the writer records before the payload and the reader checks first.

Two kinds of file share the stream layout (training/stream.py), each with its own header:

- `TrainingHeader`: a training stream (train.py). The header is the program f that `verify`
  rebuilds and replays: settings, tokenizer, token count, source hash, environment, order.
- `CompressHeader`: a file compressed with a frozen model (training/lmic.py, kind "compress").

`to_dict` gives the JSON the file stores (the layout every existing stream has); `from_dict` is
the one place a header read from a file is checked. The checksums only catch accidents, so a
forged header with valid checksums must still fail here, naming the field, before the reader
allocates or decodes anything: `StreamError("header corrupted: <field>: <what is wrong>")`.

torch is imported only inside the functions that parse the config and the order, so reading a
header's fields needs neither torch nor the model code.
"""

from dataclasses import dataclass
from typing import Any

from training.stream import StreamError

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


@dataclass(frozen=True)
class TrainingHeader:
    config: dict  # program_dict(config): the settings Bob needs to replay training
    tokenizer_name: str
    tokenizer_blob: bytes  # the serialised tokenizer (empty for bytes); stored as hex
    data_tokens: int
    code_hash: str  # sha256 of the training source; Bob refuses a stream from other code
    environment: dict  # the facts that change bits (training/environment.py checks them)
    precision: str  # config.trainer.precision, repeated for tools that read only the header
    compile: bool  # config.trainer.compile, likewise
    order: str | None = None  # a content-dependent curriculum order (curriculum.labels_to_header)

    def to_dict(self) -> dict:
        d = {
            "config": self.config, "tokenizer": {"name": self.tokenizer_name, "blob": self.tokenizer_blob.hex()},
            "data_tokens": self.data_tokens, "code_hash": self.code_hash, "environment": self.environment,
            "precision": self.precision, "compile": self.compile,
        }
        if self.order is not None:  # absent, not null, when the order follows from the settings
            d["order"] = self.order
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainingHeader":
        """Every field checked, the settings and the order parsed; the tokenizer blob's content is
        checked where it is parsed, by `tokenizer()`."""
        if not isinstance(d, dict):
            raise StreamError("header corrupted: not a JSON object")
        config = _field(d, "config", dict, "a JSON object")
        n_tokens = d.get("data_tokens")
        if type(n_tokens) is not int or not 0 < n_tokens < MAX_COUNT:
            raise StreamError(f"header corrupted: data_tokens must be a count of tokens, got {n_tokens!r:.80}")
        tokenizer, environment = d.get("tokenizer"), d.get("environment")
        if not isinstance(environment, dict) or not isinstance(tokenizer, dict):
            raise StreamError("header corrupted: environment and tokenizer must be JSON objects")
        header = cls(
            config=config,
            tokenizer_name=_field(tokenizer, "name", str, "a string", "tokenizer: name"),
            tokenizer_blob=_hex(tokenizer, "blob", "tokenizer: blob"),
            data_tokens=n_tokens,
            code_hash=_sha256(d, "code_hash"),
            environment=environment,
            precision=_field(d, "precision", str, "a string"),
            compile=_field(d, "compile", bool, "true or false"),
            order=_field(d, "order", str, "a base64 string") if "order" in d else None,
        )
        labels = header.labels()  # parsing both is the check: a bad one fails here, named
        if header.program().data.curriculum == "difficulty" and labels is None:
            raise StreamError("header corrupted: a difficulty order needs its transmitted levels (header['order'])")
        return header

    def program(self):
        """The run's settings (a `training.config.Config`)."""
        from training.config import config_from_dict

        try:
            return config_from_dict(self.config)
        except (KeyError, TypeError, ValueError) as e:  # ConfigError names the dotted key
            raise StreamError(f"header corrupted: {e}") from None

    def labels(self):
        """The transmitted curriculum order (a tensor of levels), None when the settings fix it."""
        from training.curriculum import labels_from_header

        try:
            return labels_from_header(self.order)
        except (TypeError, ValueError) as e:
            raise _corrupted("order", str(e)) from None

    def tokenizer(self):
        """The tokenizer, rebuilt from the blob (its content is checked here, where it is parsed)."""
        from training.tokenizer import build_tokenizer

        try:
            return build_tokenizer(self.tokenizer_name, serialized=self.tokenizer_blob)
        except (KeyError, TypeError, ValueError) as e:  # (TokenizerError is a ValueError)
            raise _corrupted("tokenizer", str(e)) from None


@dataclass(frozen=True)
class CompressHeader:
    format: int  # lmic.FORMAT: bumped when the coding procedure changes bits
    original_bytes: int
    tokens: int
    chunk_size: int  # tokens per chunk, each coded from a fresh BOS context
    batch_chunks: int  # chunks coded at once (fixes the shapes, hence the bits)
    top_k: int  # 0 = off
    model_checkpoint: str  # the checkpoint's file name, for the error message when it is the wrong one
    model_sha256: str  # the architecture and the parameters' bits (lmic.FrozenModel.model_sha256)
    tokenizer_name: str
    tokenizer_sha256: str
    environment: dict  # the facts that change bits, checked as for a training stream
    dtype: str  # the parameters' and logits' dtype
    kind: str = COMPRESS_KIND  # what tells a compressed file from a training stream

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "format": self.format, "original_bytes": self.original_bytes, "tokens": self.tokens,
            "chunk_size": self.chunk_size, "batch_chunks": self.batch_chunks, "top_k": self.top_k,
            "model": {"checkpoint": self.model_checkpoint, "sha256": self.model_sha256},
            "tokenizer": {"name": self.tokenizer_name, "sha256": self.tokenizer_sha256},
            "environment": self.environment, "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CompressHeader":
        """Every field checked; which format, model and tokenizer fit is for the reader to say."""
        if not isinstance(d, dict):
            raise StreamError("header corrupted: not a JSON object")
        if d.get("kind") != COMPRESS_KIND:
            raise StreamError("not a compressed file (a training stream? use train.py verify)")
        model = _field(d, "model", dict, "a JSON object")
        tokenizer = _field(d, "tokenizer", dict, "a JSON object")
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
            environment=_field(d, "environment", dict, "a JSON object"),
            dtype=_field(d, "dtype", str, "a string"),
        )
