"""Typed run configuration: YAML files are the serialised form of these dataclasses.

`load_config("configs/small.yaml", ["--trainer.max_steps", "200"])` reads the YAML with
``yaml.safe_load``, applies LightningCLI-style dotted overrides, and builds the dataclasses,
checking every key and value. Any problem raises `ConfigError` with the dotted key, the value
and what is allowed, so `train.py` can print one clear line instead of a traceback.

Everything here is part of the program f: the resolved config is stored in the stream header
and counted (compressed) in the code length.
"""

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from models.gpt import GPTConfig


class ConfigError(ValueError):
    """A config key or value a person must fix; the message names it."""


BPE_MAX_VOCAB = 1 << 16  # a sane upper bound: the embedding and softmax grow with it


@dataclass
class DataConfig:
    path: str | None = None  # a file, a directory, a glob, dataset:NAME; null = bundled tinyshakespeare
    tokenizer: Literal["bytes", "bpe"] = "bytes"
    vocab_size: int = 256  # bytes: 256; bpe: tokens to learn (> 256), trained on the data, counted in |f|
    tokenizer_file: str | None = None  # bpe: a pretrained byte-level BPE tokenizer.json (counted in |f|)
    batch_size: int = 8  # sequences per optimizer micro-step (global, across processes)
    curriculum: Literal["sequential", "shuffle", "length_warmup", "difficulty"] = "sequential"
    pacing: Literal["linear", "step", "root"] = "linear"  # how length_warmup / difficulty open up
    pacing_start: float = 0.125  # where pacing starts: a fraction of block_size, or of the chunks
    warmup_tokens: int = 0  # tokens over which pacing opens fully; 0 = the whole first pass
    difficulty_score: Literal["zlib", "length"] = "zlib"  # what makes a chunk hard (see curriculum.py)
    replay_steps: int = 0  # extra optimizer steps on already-coded chunks after each fresh batch (free)
    replay_window: int = 0  # replay from the last this-many fresh batches; 0 = all coded so far
    difficulty_levels: int = 4  # levels sent per chunk (|f| += <= log2(levels) bits each); >= chunks = full ranking


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0  # applied to matrices only
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up from 0; early steps dominate the code length
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 0.0  # 0 = off


@dataclass
class TrainerConfig:
    max_epochs: int = 1  # only the first pass is coded; later epochs just train
    max_steps: int = -1  # -1 = no limit
    accumulate_grad_batches: int = 1
    precision: Literal["32-true", "64-true", "bf16-mixed", "16-mixed"] = "32-true"
    accelerator: Literal["cpu", "gpu", "auto"] = "cpu"
    devices: int = 1
    strategy: Literal["auto", "ddp", "ddp_spawn"] = "auto"
    num_threads: int = 2  # torch intra-op threads; changes bits, recorded in the stream
    # native = the CPU's fastest kernels: a stream verifies on the same kind of CPU; portable = kernels
    # pinned before torch starts (training/environment.py): verifies on any x86-64 CPU with AVX2, slower
    kernels: Literal["native", "portable"] = "native"
    compile: bool = False  # torch.compile changes bits, recorded in the stream
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 0  # 0 = only at the end of training


@dataclass
class StreamConfig:
    enabled: bool = False  # write a real arithmetic-coded stream during training
    checksum_every: int = 50  # steps between token/parameter checksums in the stream
    # How both sides compute coding probabilities (see callbacks/arithmetic_stream.py):
    # full = free for the encoder, ~block_size forwards per batch to decode;
    # incremental = a KV-cache pass on both sides, ~one forward per batch each.
    procedure: Literal["full", "incremental"] = "full"


@dataclass
class LoggingConfig:
    wandb: bool = True  # offline: a run directory you can `wandb sync` later
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "prequel"
    wandb_group: str | None = None  # runs of one group overlay in the W&B UI (a size sweep sets it)
    csv: bool = True
    progress_bar: bool = True
    plot: bool = True


@dataclass
class Config:
    name: str = "run"
    seed: int = 1337
    run_dir: str | None = None  # null = runs/<name>-<timestamp>
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Keys that are derived, not chosen: refusing them keeps one source of truth.
_DERIVED = {"model.vocab_size": "it is set by the tokenizer"}

_POSITIVE = {
    "model.block_size", "model.n_layer", "model.n_head", "model.n_embd", "data.batch_size",
    "trainer.max_epochs", "trainer.accumulate_grad_batches", "trainer.devices",
    "trainer.log_every_n_steps", "stream.checksum_every", "optim.lr", "optim.eps", "data.vocab_size",
    "data.difficulty_levels",
}
_NON_NEGATIVE = {
    "model.dropout", "model.z_loss", "optim.weight_decay", "optim.warmup_steps", "optim.grad_clip",
    "trainer.num_threads", "trainer.checkpoint_every_n_steps", "optim.min_lr_ratio", "data.replay_steps",
    "data.replay_window", "data.warmup_tokens",
    "data.pacing_start",
}


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not allowed")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {hint} for {key}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if dotted in _DERIVED:
            raise ConfigError(f"{dotted} cannot be set: {_DERIVED[dotted]}")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key {dotted}{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{dotted}.")
        else:
            kwargs[key] = _check_type(dotted, value, hint)
            if dotted in _POSITIVE and kwargs[key] <= 0:
                raise ConfigError(f"{dotted}: must be > 0, got {value!r}")
            if dotted in _NON_NEGATIVE and kwargs[key] < 0:
                raise ConfigError(f"{dotted}: must be >= 0, got {value!r}")
    return cls(**kwargs)


def _validate(config: Config) -> None:
    m = config.model
    if not 0 <= m.ngram_order <= 6:
        raise ConfigError(f"model.ngram_order: must be in 0..6 (0 = off), got {m.ngram_order}")
    if m.ngram_order and config.trainer.devices > 1:
        raise ConfigError("model.ngram_order needs trainer.devices: 1 (each process would count only its own rows)")
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    if m.positions == "rope" and (m.n_embd // m.n_head) % 2:
        raise ConfigError("model.positions: rope needs an even head size (n_embd / n_head)")
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {m.dropout}")
    if not 0 <= config.seed < 2**32:
        raise ConfigError(f"seed: must be in [0, 2**32 - 1], got {config.seed}")
    for beta in ("beta1", "beta2"):
        if not 0 <= getattr(config.optim, beta) < 1:
            raise ConfigError(f"optim.{beta}: must be in [0, 1), got {getattr(config.optim, beta)}")
    if config.trainer.max_steps == 0 or config.trainer.max_steps < -1:
        raise ConfigError(f"trainer.max_steps: must be -1 (no limit) or > 0, got {config.trainer.max_steps}")
    _validate_data(config.data)
    if config.stream.enabled and m.dropout > 0:
        raise ConfigError("stream.enabled needs model.dropout: 0 (dropout masks are not replayable)")
    if config.stream.enabled and config.trainer.devices > 1:
        raise ConfigError("stream.enabled needs trainer.devices: 1 (the stream is written by one process)")


def _validate_data(d: DataConfig) -> None:
    if d.tokenizer == "bytes":
        if d.vocab_size != 256:
            raise ConfigError(f"data.vocab_size: the bytes tokenizer has exactly 256 symbols, got {d.vocab_size} "
                              "(use data.tokenizer: bpe for a larger vocabulary)")
        if d.tokenizer_file is not None:
            raise ConfigError("data.tokenizer_file needs data.tokenizer: bpe")
    elif d.tokenizer_file is None and not 256 < d.vocab_size <= BPE_MAX_VOCAB:
        raise ConfigError(f"data.vocab_size: bpe needs 256 < vocab_size <= {BPE_MAX_VOCAB}, got {d.vocab_size}")
    if d.pacing_start > 1:
        raise ConfigError(f"data.pacing_start: must be in [0, 1], got {d.pacing_start}")


def parse_overrides(args: list[str]) -> dict:
    """Turn ``["--a.b", "1", "--c=x"]`` into ``{"a": {"b": 1}, "c": "x"}`` (values via YAML)."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected an option like --trainer.max_steps 200, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"option --{arg[2:]} needs a value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"option --{key} conflicts with another option")
        node[leaf] = value
    return tree


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file's top-level mapping (`yaml.safe_load`), or a ConfigError naming what is wrong."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, "
                          f"got a {type(values).__name__}: {str(values)[:60]!r}")
    return values


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    values: dict = {}
    if path is not None:
        path = Path(path)
        values = read_yaml_mapping(path, "config file")
        values.setdefault("name", path.stem)
    values = _merge(values, parse_overrides(overrides or []))
    config = _build(Config, values)
    _validate(config)
    return config


def config_from_dict(values: dict) -> Config:
    config = _build(Config, values)
    _validate(config)
    return config


def to_dict(config: Config) -> dict:
    values = dataclasses.asdict(config)
    del values["model"]["vocab_size"]  # derived from the tokenizer
    return values


# Where a run writes and how it reports change no bit of training: not part of the program f.
_NOT_PROGRAM = ("name", "run_dir", "logging")


def program_dict(config: Config) -> dict:
    """The settings Bob needs to replay training (the stream stores these, |f| counts them)."""
    values = to_dict(config)
    for key in _NOT_PROGRAM:
        del values[key]
    return values


def dump_yaml(config: Config) -> str:
    """Canonical text of the program's settings, as |f| counts them."""
    return yaml.safe_dump(program_dict(config), sort_keys=True)
