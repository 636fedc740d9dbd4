"""A training stream's header: what Alice records before the payload, and Bob rebuilds f from.

The header holds the program f that `verify` rebuilds and replays: settings, tokenizer, token
count, source hash, environment, order. `to_dict` gives the JSON the stream stores
(training/stream.py); `from_dict` reads it back. Checking a header read from a file (every field,
the memory its sizes ask for; a forged header with valid checksums must fail, named, before
anything is allocated) decides whether to decode, not what is decoded: prequel/checks/stream_header.py, outside f.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingHeader:
    config: dict  # program_dict(config): the settings Bob needs to replay training
    tokenizer_name: str
    tokenizer_blob: bytes  # the serialised tokenizer (empty for bytes); stored as hex
    data_tokens: int
    code_hash: str  # sha256 of the training source; Bob refuses a stream from other code
    environment: dict  # the facts that change bits (prequel/checks/machine.py checks them)
    precision: str  # config.trainer.precision, repeated for tools that read only the header
    compile: bool  # config.trainer.compile, likewise
    order: str | None = None  # a content-dependent curriculum order (prequel/alice/difficulty.py labels_to_header)

    def to_dict(self) -> dict:
        d = {
            "config": self.config,
            "tokenizer": {"name": self.tokenizer_name, "blob": self.tokenizer_blob.hex()},
            "data_tokens": self.data_tokens,
            "code_hash": self.code_hash,
            "environment": self.environment,
            "precision": self.precision,
            "compile": self.compile,
        }
        if self.order is not None:  # absent, not null, when the order follows from the settings
            d["order"] = self.order
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainingHeader":
        """The header as stored (prequel/checks/stream_header.py `checked_header` checks it first)."""
        tokenizer = d["tokenizer"]
        return cls(
            d["config"],
            tokenizer["name"],
            bytes.fromhex(tokenizer["blob"]),
            d["data_tokens"],
            d["code_hash"],
            d["environment"],
            d["precision"],
            d["compile"],
            d.get("order"),
        )

    def program(self):
        """The run's settings (a `training.config.Config`)."""
        from prequel.training.config import from_program_dict  # (reading a header's fields needs no torch)

        return from_program_dict(self.config)

    def labels(self):
        """The transmitted curriculum order (a tensor of levels), None when the settings fix it."""
        if self.order is None:
            return None
        from prequel.training.orders import labels_from_header  # (only a run with a transmitted order needs it in f)

        config = self.program()
        n_chunks = -(-self.data_tokens // config.chunk_len)
        return labels_from_header(self.order, n_chunks, min(config.data.difficulty_levels, n_chunks))

    def tokenizer(self):
        """The tokenizer, rebuilt from the blob."""
        from prequel.training.tokenizer import restore_tokenizer

        return restore_tokenizer(self.tokenizer_name, self.tokenizer_blob)
