"""A frozen trained model for `prequel compress`: a checkpoint's GPT and tokenizer, and what names them.

A run directory or a .ckpt file gives the GPT's settings (its hyper-parameters, or its run's config),
its weights (`torch.load(..., weights_only=True)`) and its tokenizer (the run's BPE, or bytes).
`FrozenModel.model_sha256` is what fixes the probabilities: the architecture and the parameters' bits.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import yaml

from prequel.alice.corpus import read_corpus
from prequel.alice.tokenizing import build_tokenizer
from prequel.callbacks.arithmetic_stream import parameters_sha256
from prequel.checks.settings import Config, ConfigError, config_from_dict
from prequel.models.gpt import GPT, GPTConfig
from prequel.program import packed_bits
from prequel.training.data import DataError
from prequel.training.stream import StreamError, read_stream
from prequel.verify.verifier import STREAM_NAME


class CompressError(StreamError):
    """A checkpoint or compressed file that cannot be used as is; the message says why."""


@dataclass
class FrozenModel:
    gpt: GPT
    tokenizer: object  # ByteTokenizer | BPETokenizer
    path: Path  # the checkpoint file
    params_sha256: str
    param_bytes: int  # parameters at their stored precision, a shared (tied) tensor once

    @property
    def model_sha256(self) -> str:
        """What fixes the probabilities: the architecture and the parameters' bits."""
        config = json.dumps(asdict(self.gpt.config), sort_keys=True)
        return hashlib.sha256(f"{config}\n{self.params_sha256}".encode()).hexdigest()

    @property
    def tokenizer_sha256(self) -> str:
        return hashlib.sha256(self.tokenizer.name.encode() + b"\n" + self.tokenizer.serialize()).hexdigest()

    @property
    def tokenizer_bytes(self) -> int:
        return packed_bits(self.tokenizer.serialize()) // 8  # as |f| counts it; 0 for bytes


def checkpoint_path(path: Path) -> Path:
    path = Path(path)
    ckpt = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    if not ckpt.is_file():
        raise CompressError(f"no checkpoint at {ckpt} (give a run directory or a .ckpt file)")
    return ckpt


def load_frozen(path: Path) -> FrozenModel:
    """The model, in eval mode, and its tokenizer from a run directory or a checkpoint file."""
    ckpt_path = checkpoint_path(path)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike
        raise CompressError(f"{ckpt_path} is not a readable checkpoint: {e}") from None
    stored = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    state = {k.removeprefix("model."): v for k, v in stored.items() if isinstance(v, torch.Tensor)}
    run_config = _run_config(ckpt, ckpt_path)
    if run_config is not None and run_config.mixture.members:
        raise CompressError(
            f"{ckpt_path} holds a mixture of {run_config.mixture.members}: compress codes with one "
            "model; train one size, or verify the mixture's own stream"
        )
    gpt = GPT(_gpt_config(ckpt, run_config, ckpt_path))
    try:
        gpt.load_state_dict(state)
    except RuntimeError as e:
        raise CompressError(f"{ckpt_path}: weights do not fit the model its config describes: {e}") from None
    gpt.eval()
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}
    return FrozenModel(
        gpt,
        _tokenizer(ckpt_path, run_config, gpt.config.vocab_size),
        ckpt_path,
        parameters_sha256(gpt),
        sum(unique.values()),
    )


def run_dir_of(ckpt_path: Path) -> Path | None:
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else None


def _run_config(ckpt: dict, ckpt_path: Path) -> Config | None:
    """The run's settings: stored in the checkpoint, else the run directory's config.yaml."""
    hparams = ckpt.get("hyper_parameters") or {}
    try:
        if isinstance(hparams.get("config"), dict):
            return config_from_dict(hparams["config"])
        run_dir = run_dir_of(ckpt_path)
        if run_dir is not None and (run_dir / "config.yaml").is_file():
            return config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    except (ConfigError, yaml.YAMLError) as e:
        raise CompressError(f"{ckpt_path}: its run config is not valid: {e}") from None
    return None


def _gpt_config(ckpt: dict, run_config: Config | None, ckpt_path: Path) -> GPTConfig:
    hparams = ckpt.get("hyper_parameters") or {}
    try:
        if isinstance(hparams.get("model"), dict):
            return GPTConfig(**hparams["model"])
        if run_config is not None and "vocab_size" in hparams:
            return replace(run_config.model, vocab_size=int(hparams["vocab_size"]))
    except TypeError as e:
        raise CompressError(f"{ckpt_path}: model settings not understood: {e}") from None
    raise CompressError(
        f"{ckpt_path} does not say which model it holds (no hyper_parameters and no "
        "config.yaml in its run directory): give a prequel checkpoint or run directory"
    )


def _tokenizer(ckpt_path: Path, run_config: Config | None, vocab_size: int):
    """Bytes models need nothing; a BPE comes from the run's stream header, else is retrained
    (deterministically) from the run's corpus, exactly as training built it."""
    if vocab_size == 256:
        return build_tokenizer("bytes")
    run_dir = run_dir_of(ckpt_path)
    try:
        if run_dir is not None and (run_dir / STREAM_NAME).is_file():
            info = read_stream(run_dir / STREAM_NAME).header["tokenizer"]
            tokenizer = build_tokenizer(info["name"], serialized=bytes.fromhex(info["blob"]))
        elif run_config is not None:
            d = run_config.data
            data = None if d.tokenizer_file else read_corpus(d.path)
            tokenizer = build_tokenizer(d.tokenizer, data=data, vocab_size=d.vocab_size, pretrained=d.tokenizer_file)
        else:
            raise CompressError(
                f"{ckpt_path}: a {vocab_size}-token model needs its BPE tokenizer; give its run directory"
            )
    except (DataError, StreamError, KeyError, ValueError) as e:
        raise CompressError(f"{ckpt_path}: cannot rebuild the model's tokenizer: {e}") from None
    if tokenizer.vocab_size != vocab_size:
        raise CompressError(
            f"{ckpt_path}: the rebuilt tokenizer has {tokenizer.vocab_size} tokens, the model {vocab_size}"
        )
    return tokenizer
