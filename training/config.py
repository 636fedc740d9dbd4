"""Typed run configuration: YAML files are the serialised form of these dataclasses.

`load_config("configs/small.yaml", ["--trainer.max_steps", "200"])` reads the YAML with
``yaml.safe_load``, applies LightningCLI-style dotted overrides, and builds the dataclasses,
checking every key and value. Any problem raises `ConfigError` with the dotted key, the value
and what is allowed, so `train.py` can print one clear line instead of a traceback.

Each field says everything about itself in one place: its type, its default, its limit
(``Annotated[int, POSITIVE]``) and, in its ``# comment``, what it means; `train.py --help`
lists them from here.

Everything here is part of the program f: the resolved config is stored in the stream header
and counted (compressed) in the code length.
"""

import dataclasses
import difflib
import math
import os
import re
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import yaml

from models.gpt import GPTConfig
from models.ngram import HASH_BITS
from training.curriculum import CURRICULA, PACINGS, plan_size


class ConfigError(ValueError):
    """A config key or value a person must fix; the message names it."""


class MemoryLimitError(ConfigError):
    """Settings that are valid but would need more memory than the limit (`check_memory`); `key`
    is the setting the message names (or "data_tokens")."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Limit:
    """The values a number field allows, annotated on the field (``Annotated[int, POSITIVE]``)
    and checked with its type, so a limit is stated once, beside what it limits."""

    text: str  # completes "must be ...", in errors and in --help
    allows: Callable[[float], bool]


POSITIVE = Limit("> 0", lambda v: v > 0)
NON_NEGATIVE = Limit(">= 0", lambda v: v >= 0)
BELOW_ONE = Limit("in [0, 1)", lambda v: 0 <= v < 1)
FRACTION = Limit("in [0, 1]", lambda v: 0 <= v <= 1)

BPE_MAX_VOCAB = 1 << 16  # a sane upper bound: the embedding and softmax grow with it
# torch's thread pool starts one OS thread per intra-op thread: 100000 exhaust the process's
# threads (libgomp fails, then torch segfaults), and no CPU runs more than 1024 threads at once.
MAX_THREADS = 1024
MAX_EPOCHS = 1000  # far beyond any useful run on seen data; what a stream may make Bob replay


@dataclass
class DataConfig:
    path: str | None = None  # a file, a directory, a glob, dataset:NAME; null = bundled tinyshakespeare
    tokenizer: Literal["bytes", "bpe"] = "bytes"  # bytes: one token per byte; bpe: byte-level BPE learned from the data
    vocab_size: Annotated[int, POSITIVE] = 256  # bytes: 256; bpe: tokens to learn (> 256), counted in |f|
    tokenizer_file: str | None = None  # bpe: a pretrained byte-level BPE tokenizer.json (counted in |f|)
    batch_size: Annotated[int, POSITIVE] = 8  # sequences per optimizer micro-step (global, across processes)
    curriculum: Literal[CURRICULA] = "sequential"  # the order chunks are coded in (see training/curriculum.py)
    pacing: Literal[PACINGS] = "linear"  # how length_warmup / difficulty open up
    pacing_start: Annotated[float, FRACTION] = 0.125  # where pacing starts: a fraction of block_size, or of the chunks
    warmup_tokens: Annotated[int, NON_NEGATIVE] = 0  # tokens over which pacing opens fully; 0 = the whole first pass
    difficulty_score: Literal["zlib", "length"] = "zlib"  # what makes a chunk hard (see curriculum.py)
    # extra optimizer steps on already-coded chunks after each fresh batch (free in bits)
    replay_steps: Annotated[int, NON_NEGATIVE] = 0
    replay_window: Annotated[int, NON_NEGATIVE] = 0  # replay the last this-many fresh batches; 0 = all coded so far
    # levels sent per chunk (|f| += <= log2(levels) bits each); >= chunks = full ranking
    difficulty_levels: Annotated[int, POSITIVE] = 4


@dataclass
class OptimConfig:
    lr: Annotated[float, POSITIVE] = 1e-3  # AdamW's learning rate after warm-up
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0  # applied to matrices only
    beta1: Annotated[float, BELOW_ONE] = 0.9  # AdamW's decay of the gradient average
    beta2: Annotated[float, BELOW_ONE] = 0.99  # AdamW's decay of the squared-gradient average
    eps: Annotated[float, POSITIVE] = 1e-8  # AdamW's term added to the denominator
    warmup_steps: Annotated[int, NON_NEGATIVE] = 0  # linear warm-up from 0; early steps dominate the code length
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up: constant, or cosine decay over all steps
    min_lr_ratio: Annotated[float, NON_NEGATIVE] = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: Annotated[float, NON_NEGATIVE] = 0.0  # 0 = off


@dataclass
class TrainerConfig:
    # only the first pass is coded; later epochs just train (and Bob replays them: bounded, so a
    # forged header cannot make verify loop for ever)
    max_epochs: Annotated[int, Limit(f"in 1..{MAX_EPOCHS}", lambda v: 1 <= v <= MAX_EPOCHS)] = 1
    max_steps: Annotated[int, Limit("-1 or > 0", lambda v: v == -1 or v > 0)] = -1  # optimizer steps; -1 = no limit
    accumulate_grad_batches: Annotated[int, POSITIVE] = 1  # micro-steps (batches) per optimizer step
    precision: Literal["32-true", "64-true", "bf16-mixed", "16-mixed"] = "32-true"  # changes bits, recorded in the stream
    accelerator: Literal["cpu", "gpu", "auto"] = "cpu"  # Lightning's; a stream records the device it was made on
    devices: Annotated[int, POSITIVE] = 1  # processes (DDP): each codes its rows of a batch into its own sub-stream
    strategy: Literal["auto", "ddp", "ddp_spawn"] = "auto"  # Lightning's, for devices > 1
    # torch intra-op threads (0 = torch's default); changes bits, recorded in the stream
    num_threads: Annotated[int, Limit(f"in 0..{MAX_THREADS} (one OS thread each)", lambda v: 0 <= v <= MAX_THREADS)] = 2
    # native = the CPU's fastest kernels: a stream verifies on the same kind of CPU; portable = kernels
    # pinned before torch starts (training/environment.py): verifies on any x86-64 CPU with AVX2, slower
    kernels: Literal["native", "portable"] = "native"
    compile: bool = False  # torch.compile changes bits, recorded in the stream
    log_every_n_steps: Annotated[int, POSITIVE] = 10  # steps between logged metrics
    checkpoint_every_n_steps: Annotated[int, NON_NEGATIVE] = 0  # 0 = only at the end of training
    # keep every periodic checkpoint (checkpoints/step=N.ckpt; last.ckpt links the newest): `verify
    # --jobs N` audits the stream's stretches between them in parallel (tools/audit.py)
    keep_checkpoints: bool = True


@dataclass
class StreamConfig:
    enabled: bool = False  # write a real arithmetic-coded stream during training
    checksum_every: Annotated[int, POSITIVE] = 50  # steps between token/parameter checksums in the stream
    # How both sides compute coding probabilities (see callbacks/arithmetic_stream.py):
    # full = free for the encoder, ~block_size forwards per batch to decode;
    # incremental = a KV-cache pass on both sides, ~one forward per batch each.
    procedure: Literal["full", "incremental"] = "full"


@dataclass
class MixtureConfig:
    # K >= 2 GPTs trained side by side on the same batches, coding with a mixture (models/mixture.py):
    # comma-separated LAYERSxHEADSxWIDTH[@LR], e.g. "1x2x32@3e-3, 2x4x128@2e-3" (LR: optim.lr if left
    # out); the model section gives everything else. Empty: one model, the model section's
    members: str = ""
    weights: Literal["bayes", "switch"] = "bayes"  # bayes: weights ∝ likelihood of the coded prefix; switch: fixed share
    switch_rate: Annotated[float, FRACTION] = 0.01  # switch: the share of weight spread over all members before each column


@dataclass
class LoggingConfig:
    wandb: bool = True  # offline: a run directory you can `wandb sync` later
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"  # how W&B logs (offline needs no account)
    wandb_project: str = "prequel"  # the W&B project runs are logged to
    wandb_group: str | None = None  # runs of one group overlay in the W&B UI (a size sweep sets it)
    csv: bool = True  # metrics to <run_dir>/csv/metrics.csv
    progress_bar: bool = True  # Lightning's progress bar
    plot: bool = True  # <run_dir>/loss_curve.png at the end


@dataclass
class Config:
    name: str = "run"  # names the run directory; a config file's name by default
    seed: Annotated[int, Limit("in [0, 2**32 - 1]", lambda v: 0 <= v < 2**32)] = 1337  # all randomness in training
    run_dir: str | None = None  # null = runs/<name>-<timestamp>
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Keys that are derived, not chosen: refusing them keeps one source of truth.
_DERIVED = {"model.vocab_size": "it is set by the tokenizer"}

# GPTConfig's limits. Its fields live in models/gpt.py, which cannot import Limit from here
# (this module imports it), so they are listed here and checked by the same code as the rest.
_MODEL_LIMITS = {
    "block_size": POSITIVE, "n_layer": POSITIVE, "n_head": POSITIVE, "n_embd": POSITIVE, "dropout": BELOW_ONE,
    "z_loss": NON_NEGATIVE, "ngram_order": Limit("in 0..6 (0 = off)", lambda v: 0 <= v <= 6),
}


def field_types(cls: type) -> dict[str, Any]:
    """Each field's type, with its limits as ``Annotated`` metadata."""
    hints = typing.get_type_hints(cls, include_extras=True)
    if cls is GPTConfig:
        hints.update({name: Annotated[hints[name], limit] for name, limit in _MODEL_LIMITS.items()})
    return hints


def leaf_fields(cls: type = Config, prefix: str = ""):
    """(dotted key, dataclass field, type) of every settable key, section by section."""
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_fields(hints[f.name], f"{key}.")
        elif key not in _DERIVED:
            yield key, f, hints[f.name]


def limits_of(hint: Any) -> tuple[Limit, ...]:
    return tuple(m for m in typing.get_args(hint)[1:] if isinstance(m, Limit)) \
        if typing.get_origin(hint) is Annotated else ()


# The keys with the two common limits (tests check each one's message).
POSITIVE_KEYS = {key for key, _, hint in leaf_fields() if POSITIVE in limits_of(hint)}
NON_NEGATIVE_KEYS = {key for key, _, hint in leaf_fields() if NON_NEGATIVE in limits_of(hint)}


# Every way people write a float, for float fields: YAML 1.1 reads 1e-3, 1E-3 and 1e+3 as strings
# (its floats need a dot), and "inf"/"nan" too (they are then refused as not finite).
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?\.?(inf|infinity|nan)", re.IGNORECASE)


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Annotated:
        checked = _check_type(key, value, typing.get_args(hint)[0])
        for limit in limits_of(hint):
            if not limit.allows(checked):
                raise ConfigError(f"{key}: must be {limit.text}, got {value!r}")
        return checked
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
        # 1e-3: YAML 1.1 reads a float without a dot as a string
        number = float(value) if isinstance(value, str) and _FLOAT.fullmatch(value.strip()) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(number)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {hint} for {key}")


def build_dataclass(cls: type, values: dict, prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = field_types(cls)
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
            kwargs[key] = build_dataclass(hint, value, f"{dotted}.")
        else:
            kwargs[key] = _check_type(dotted, value, hint)
    return cls(**kwargs)


def _validate(config: Config) -> None:
    """What no single field's limit can say: how fields depend on each other."""
    m = config.model
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    if m.positions == "rope" and (m.n_embd // m.n_head) % 2:
        raise ConfigError("model.positions: rope needs an even head size (n_embd / n_head)")
    _validate_data(config.data)
    mixture_members(config)  # checks the members
    if config.stream.enabled and m.dropout > 0:
        raise ConfigError("stream.enabled needs model.dropout: 0 (dropout masks are not replayable)")
    if config.stream.enabled and config.trainer.strategy == "ddp_spawn":
        raise ConfigError("trainer.strategy: ddp_spawn cannot write a stream (it pickles the training state into a "
                          "new process, and the range coder cannot be pickled); use trainer.strategy: ddp or auto")
    check_memory(config)


def _validate_data(d: DataConfig) -> None:
    if d.tokenizer == "bytes":
        if d.vocab_size != 256:
            raise ConfigError(f"data.vocab_size: the bytes tokenizer has exactly 256 symbols, got {d.vocab_size} "
                              "(use data.tokenizer: bpe for a larger vocabulary)")
        if d.tokenizer_file is not None:
            raise ConfigError("data.tokenizer_file needs data.tokenizer: bpe")
    elif d.tokenizer_file is None and not 256 < d.vocab_size <= BPE_MAX_VOCAB:
        raise ConfigError(f"data.vocab_size: bpe needs 256 < vocab_size <= {BPE_MAX_VOCAB}, got {d.vocab_size}")


# --- memory: every number that sizes an allocation is checked before anything is allocated ------
#
MAX_MEMBERS = 8
_MEMBER = re.compile(r"(\d+)x(\d+)x(\d+)(?:@(.+))?")


def mixture_members(config: Config) -> list[tuple[GPTConfig, float]]:
    """The mixture's members as (GPT settings, learning rate); [] for one model."""
    text = config.mixture.members.strip()
    if not text:
        return []
    members = []
    for spec in (part.strip() for part in text.split(",")):
        match = _MEMBER.fullmatch(spec)
        lr = _FLOAT.fullmatch(match.group(4).strip()) if match and match.group(4) else None
        if not match or (match.group(4) and not lr):
            raise ConfigError(f"mixture.members: {spec!r} is not LAYERSxHEADSxWIDTH[@LR] (e.g. 2x4x128@2e-3)")
        n_layer, n_head, n_embd = map(int, match.group(1, 2, 3))
        rate = float(match.group(4)) if lr else config.optim.lr
        m = dataclasses.replace(config.model, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        if min(n_layer, n_head, n_embd) < 1 or n_embd % n_head or not (math.isfinite(rate) and rate > 0):
            raise ConfigError(f"mixture.members: {spec!r}: layers, heads, width and LR must be > 0, width divisible "
                              "by heads")
        if m.positions == "rope" and (n_embd // n_head) % 2:
            raise ConfigError(f"mixture.members: {spec!r}: rope needs an even head size (width / heads)")
        members.append((m, rate))
    if not 2 <= len(members) <= MAX_MEMBERS:
        raise ConfigError(f"mixture.members: a mixture needs 2..{MAX_MEMBERS} members, got {len(members)}")
    if config.model.ngram_order:
        raise ConfigError("mixture.members needs model.ngram_order: 0 (each member would keep its own count tables)")
    if config.model.z_loss:
        raise ConfigError("mixture.members needs model.z_loss: 0 (the members' losses are their own NLL)")
    if config.trainer.devices > 1:
        raise ConfigError("mixture.members needs trainer.devices: 1 (the weights follow every coded token in order)")
    return members


# A config (or a stream header, which is one) names sizes: layers, width, context, batch, vocabulary,
# n-gram tables, tokens, replay steps. Each is fine alone, but a forged or mistyped one (n_layer:
# 100000, block_size: 2**31) would make training allocate until the machine runs out, then fail
# with a message about something else. So the memory a run needs is estimated from the settings
# alone, and a run over the limit is refused, naming the setting that makes it so.

MEMORY_ENV = "PREQUEL_MAX_MEMORY_GB"  # the limit in GB (10**9 bytes), inherited by child processes
DEFAULT_MAX_MEMORY_GB = 16.0  # generous for every shipped config (configs/compress-gpu.yaml needs ~0.3 GB)
_GB = 10**9
_ACTIVATIONS_PER_LAYER = 20  # floats kept per token per layer for backward (qkv, attention, MLP 4x twice, norms)
_LOGITS_COPIES = 4  # logits, log-softmax, their gradient and a spare, per vocabulary entry and n-gram order
TAPE_BYTES_PER_TOKEN = 16  # an int64 token, plus the bytes it decodes to and the tokenizer's work
_SPAN_BYTES = 160  # per chunk of a plan: its span, rank, tie-break and draw (curriculum.py)
_STEP_BYTES = 256  # per step of a plan: a (B, 2) span tensor's object (plus 16 bytes a row)


def max_memory_bytes() -> int:
    """The memory a run may ask for: $PREQUEL_MAX_MEMORY_GB, else DEFAULT_MAX_MEMORY_GB."""
    text = os.environ.get(MEMORY_ENV, "").strip()
    if not text:
        return int(DEFAULT_MAX_MEMORY_GB * _GB)
    try:
        gb = float(text)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and gb > 0):
        raise ConfigError(f"{MEMORY_ENV}: expected a number of gigabytes > 0, got {text!r}")
    return int(gb * _GB)


def format_bytes(n: int) -> str:
    """Bytes in decimal units, as the limit is given: 16 GB, 5.6 GB, 340.2 MB."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            break
    return f"{n / size:,.1f}".removesuffix(".0") + f" {unit}"


def parameter_count(m: GPTConfig, vocab_size: int) -> int:
    """What `GPT(m).num_params()` will be, without building it (a tied embedding counted once)."""
    E, L, V, K = m.n_embd, m.n_layer, vocab_size, m.ngram_order
    return ((V + 1) * E + (m.block_size * E if m.positions == "learned" else 0) + L * 12 * E * E  # embeddings; blocks
            + (2 * L + 1) * E * (2 if m.bias else 1) + (9 * L * E if m.bias else 0)  # norms; linear biases
            + (0 if m.tie_embeddings else V * E) + K * (E + 1))  # output head; n-gram mixer


def model_memory(m: GPTConfig, vocab_size: int, batch: int, training: bool = True, width: int = 4,
                 kv_cache: bool = False) -> list[tuple[str, int]]:
    """(what, bytes) of the memory a GPT of config `m` needs for batches of `batch` full-length
    sequences: weights (with gradients and AdamW's two moments when `training`), n-gram count
    tables, activations and logits, and the incremental coder's key/value cache. Estimates, within
    a small factor of what torch allocates; `width` is bytes per float (8 for 64-true)."""
    E, L, T, K, V = m.n_embd, m.n_layer, m.block_size, m.ngram_order, vocab_size
    params = parameter_count(m, vocab_size)
    parts = [(f"{params:,} parameters" + (" with their gradients and AdamW state" if training else ""),
              (4 if training else 1) * params * width)]
    if K:
        tables = (V + 1) * V + (K - 1) * (1 << HASH_BITS) * V
        parts.append((f"the n-gram count tables of orders 1..{K} ({tables:,} counts)", tables * width))
    per_token = (L * _ACTIVATIONS_PER_LAYER * E if training else 8 * E) + _LOGITS_COPIES * V * (1 + K)
    parts.append((f"activations and logits of {batch:,} sequences of {T:,} tokens", batch * T * per_token * width))
    if kv_cache:
        parts.append(("the incremental coder's key/value cache", 2 * L * batch * T * E * width))
    return parts


def run_memory(config: Config, data_tokens: int | None = None) -> list[tuple[str, int]]:
    """(what, bytes) of the memory training (or verify's replay of it) needs; with the token count,
    also the data and the batch plan."""
    m, d = config.model, config.data
    vocab_size = max(d.vocab_size, 256)  # (the tokenizer sets model.vocab_size; BPE at least 256)
    parts = [part for member in ([c for c, _ in mixture_members(config)] or [m])
             for part in model_memory(member, vocab_size, d.batch_size, training=True,
                                      width=8 if config.trainer.precision == "64-true" else 4,
                                      kv_cache=config.stream.enabled and config.stream.procedure == "incremental")]
    if data_tokens is not None:
        parts.append((f"{data_tokens:,} tokens of data", data_tokens * TAPE_BYTES_PER_TOKEN))
        chunks, steps = plan_size(data_tokens, m.block_size, d.batch_size, d.curriculum, d.pacing_start,
                                  d.replay_steps)
        parts.append((f"the plan of {steps:,} training steps over {chunks:,} chunks",
                      chunks * _SPAN_BYTES + steps * (_STEP_BYTES + 16 * d.batch_size)))
    return parts


# The settings `run_memory` grows with, each tried at its default to find the one to name.
_SIZING_KEYS = ("model.n_layer", "model.n_embd", "model.block_size", "model.ngram_order", "data.batch_size",
                "data.vocab_size", "data.replay_steps", "data.pacing_start", "trainer.precision", "stream.procedure")


def _with_default(config: Config, key: str) -> Config:
    section, name = key.split(".")
    default = getattr(getattr(Config(), section), name)
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{name: default})})


def check_memory(config: Config, data_tokens: int | None = None, limit: int | None = None) -> None:
    """Refuse settings whose run would need more than `limit` bytes (default: `max_memory_bytes`),
    naming the setting that takes most of it (the one whose default value would save the most),
    the estimate, and how to raise the limit. Pure arithmetic: nothing is allocated."""
    limit = max_memory_bytes() if limit is None else limit
    parts = run_memory(config, data_tokens)
    total = sum(n for _, n in parts)
    if total <= limit:
        return
    saved = {key: total - sum(n for _, n in run_memory(_with_default(config, key), data_tokens)) for key in _SIZING_KEYS}
    if data_tokens is not None:  # the data's own share: what one chunk of it would need instead
        saved["data_tokens"] = total - sum(n for _, n in run_memory(config, min(data_tokens, config.model.block_size)))
    key = max(saved, key=saved.get)
    what, most = max(parts, key=lambda part: part[1])
    if key == "data_tokens":
        shown, advice = f"{data_tokens:,}", ""
    else:
        section, name = key.split(".")
        value, default = getattr(getattr(config, section), name), getattr(getattr(Config(), section), name)
        shown = str(value)
        advice = (f"{'lower' if value > default else 'raise'} it" if isinstance(value, (int, float)) else "change it") \
            + f" (default {default}); "
    raise MemoryLimitError(
        f"{key} = {shown}: training would need about {format_bytes(total)} of memory ({format_bytes(most)} for {what}), "
        f"more than the limit of {format_bytes(limit)}; {advice}if this machine has the memory, raise the limit: "
        f"{MEMORY_ENV}={math.ceil(total / _GB)}", key)


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


def merge_values(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge_values(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))
MAX_CONFIG_FILE_BYTES = 16 << 20  # no config file is this large


def regular_file_size(path: Path, what: str, max_bytes: int, why: str, error: type[Exception] = ConfigError) -> int:
    """The size of `path`, checked before anything reads it: it must be a regular file (a device
    such as /dev/zero or /dev/urandom never ends, a FIFO blocks, a directory is not a file) of at
    most `max_bytes` (`why` says where that limit comes from)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what}: file not found: {path}") from None
    except OSError as e:
        raise error(f"{what}: cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a file")
        raise error(f"{what}: {path} is {kind}, not a regular file; give a regular file")
    if info.st_size > max_bytes:
        raise error(f"{what}: {path} is {format_bytes(info.st_size)}, more than the {format_bytes(max_bytes)} "
                    f"allowed ({why})")
    return info.st_size


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file's top-level mapping (`yaml.safe_load`), or a ConfigError naming what is wrong."""
    if not path.exists():
        raise ConfigError(f"{what} not found: {path}")
    regular_file_size(path, what, MAX_CONFIG_FILE_BYTES, "no config file is this large")
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
    values = merge_values(values, parse_overrides(overrides or []))
    config = build_dataclass(Config, values)
    _validate(config)
    return config


def config_from_dict(values: dict) -> Config:
    config = build_dataclass(Config, values)
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

