"""Typed run configuration: YAML files are the serialised form of these dataclasses.

Each field says everything about itself in one place: its type, its default, its limit
(``Annotated[int, POSITIVE]``) and, in its ``# comment``, what it means; `prequel --help`
lists them from here. Reading YAML and command-line overrides, and checking every value, are
Alice's (prequel/checks/settings.py `load_config`); a stream's header stores `program_dict` of the checked
config, and Bob rebuilds it with `from_program_dict`. The settings are counted (compressed) in |f|.
"""

import dataclasses
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

from prequel.models.gpt import GPTConfig
from prequel.training.curriculum import CURRICULA, PACINGS


class ConfigError(ValueError):
    """A config key or value a person must fix; the message names it."""


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
    # tokens before each chunk that the model reads, not codes (coded in earlier batches; BOS where
    # none): every coded token gets at least this much context; chunks are block_size - context long
    context: Annotated[int, NON_NEGATIVE] = 0


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
    # changes bits, recorded in the stream
    precision: Literal["32-true", "64-true", "bf16-mixed", "16-mixed"] = "32-true"
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
    # --jobs N` audits the stream's stretches between them in parallel (prequel/verify/audit.py)
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
    # bayes: weights ∝ likelihood of the coded prefix; switch: fixed share
    weights: Literal["bayes", "switch"] = "bayes"
    # switch: the share of weight spread over all members before each column
    switch_rate: Annotated[float, FRACTION] = 0.01


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

    @property
    def chunk_len(self) -> int:
        """Tokens coded per row: block_size, less the context read before them."""
        return self.model.block_size - self.data.context


# The one pattern for floats in text (mixture learning rates, config values): YAML 1.1 reads 1e-3,
# 1E-3 and 1e+3 as strings (its floats need a dot), and "inf"/"nan" too.
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?\.?(inf|infinity|nan)", re.IGNORECASE)


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
            raise ConfigError(
                f"mixture.members: {spec!r}: layers, heads, width and LR must be > 0, width divisible by heads"
            )
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


def from_program_dict(values: dict) -> Config:
    """A header's settings (`program_dict`: JSON of a checked Config) as a Config again. Bob's side:
    prequel/checks/settings.py `config_from_dict` checks every key and value of a header's before it gets here."""
    hints = typing.get_type_hints(Config)
    return Config(**{k: hints[k](**v) if dataclasses.is_dataclass(hints[k]) else v for k, v in values.items()})
