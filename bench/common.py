"""What the bench scripts share: a config, a prefix of the corpus, and a timed Lightning fit.

A run's steady-state throughput is timed between the end of batch `warmup - 1` and the end of
the last batch, so Trainer set-up, the first (slow) steps and teardown are left out and every
timed interval is a whole step: data, hooks, forward, backward, optimizer, callbacks.
"""

import argparse
import logging
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root (tests.helpers, bench modules)

from prequel.alice.fit import tokenize  # noqa: E402
from prequel.alice.shards import open_corpus  # noqa: E402
from prequel.callbacks.code_length import CodeLength  # noqa: E402
from prequel.checks.settings import Config, counted_yaml, load_config  # noqa: E402
from prequel.cli.commands import quiet_warnings  # noqa: E402
from prequel.program import f_parts  # noqa: E402
from prequel.training import environment  # noqa: E402
from prequel.training.curriculum import plan_batches  # noqa: E402
from prequel.training.data import IGNORE, Tape  # noqa: E402
from prequel.training.kernels import device_of  # noqa: E402
from prequel.training.module import PrequelModule  # noqa: E402
from prequel.training.run import build_trainer, set_determinism  # noqa: E402

# Nothing but training: no loggers, plots or progress bar (the scripts' overrides may turn them on).
BENCH_OVERRIDES = [
    "--logging.wandb",
    "false",
    "--logging.csv",
    "false",
    "--logging.plot",
    "false",
    "--logging.progress_bar",
    "false",
    "--trainer.max_epochs",
    "1",
    "--trainer.max_steps",
    "-1",
]


def bench_parser(description: str) -> argparse.ArgumentParser:
    """A bench script's parser: --config, and (parse_known_args) --dotted.keys overrides as in train.py."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=f"{description} Other --dotted.keys override the config, as in train.py."
    )
    parser.add_argument("--config", default="configs/small.yaml", help="YAML config (default: %(default)s)")
    return parser


def bench_config(path: str, overrides: list[str]) -> Config:
    """The config as `train.py` would load it, with the bench defaults, then the user's overrides."""
    quiet_warnings()
    environment.allow_reexec()  # a portable config restarts the script with the kernel pins
    for name in ("lightning.pytorch", "lightning.fabric"):  # "GPU available: False ..." and tips
        logging.getLogger(name).setLevel(logging.WARNING)
    config = load_config(path, BENCH_OVERRIDES + overrides)
    set_determinism(config)  # torch threads = trainer.num_threads, as in training
    return config


def print_environment(config: Config) -> None:
    print(
        f"torch {torch.__version__}, lightning {L.__version__}, python {platform.python_version()}, "
        f"{platform.machine()}; torch threads {torch.get_num_threads()} "
        f"(trainer.num_threads {config.trainer.num_threads})"
    )
    m, d = config.model, config.data
    print(
        f"model {m.n_layer} × {m.n_embd} (head {m.head}), block_size {m.block_size}, batch_size {d.batch_size}, "
        f"precision {config.trainer.precision}, compile {config.trainer.compile}"
    )


def corpus_prefix(config: Config, n_tokens: int):
    """(tokenizer, tokens, tape) for the first `n_tokens` tokens of the configured corpus."""
    tokenizer, tokens = tokenize(config, open_corpus(config.data.path))
    if n_tokens > len(tokens):
        raise SystemExit(f"the corpus has only {len(tokens):,} tokens; asked for {n_tokens:,}")
    tokens = tokens[:n_tokens]
    return tokenizer, tokens, Tape(tokens, bos_id=tokenizer.vocab_size, nbytes_per_id=tokenizer.nbytes_per_id())


def code_length_callback(config: Config, tokenizer, n_tokens: int) -> CodeLength:
    return CodeLength(f_parts(config, counted_yaml(config), tokenizer.serialize()), n_tokens)


class Clock(L.Callback):
    """Tokens and seconds of the batches after the first `warmup` (listed last, runs last); each
    step's (tokens, seconds) appended to `steps`, if given."""

    def __init__(self, warmup: int, steps: list | None = None):
        self.warmup, self.tokens, self.t0, self.t1, self.steps = warmup, 0, None, None, steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if batch_idx == self.warmup - 1:
            self.t0 = now
        elif batch_idx >= self.warmup:
            tokens = int(batch["spans"][:, 1].sum())
            if self.steps is not None:
                self.steps.append((tokens, now - self.t1 if self.t1 is not None else now - self.t0))
            self.t1, self.tokens = now, self.tokens + tokens

    def tokens_per_s(self) -> float:
        if self.t1 is None:
            raise SystemExit(f"no batch after the {self.warmup} warm-up batches: give more tokens or steps")
        return self.tokens / (self.t1 - self.t0)


class CrossEntropyStep(PrequelModule):
    """prequel's GPT, optimizer and data, with a nanoGPT training step: logits, mean cross-entropy,
    nothing else (no code length, no coded batch, no logging). In prequel's Trainer, it measures
    what Lightning's loop itself costs."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, y = self.tape.batch(batch["spans"])
        logits = self.model(self._to_device(x))
        return F.cross_entropy(logits.float().flatten(0, 1), self._to_device(y).flatten(), ignore_index=IGNORE)


def lightning_tokens_per_s(
    config: Config,
    tape: Tape,
    vocab_size: int,
    callbacks: list,
    warmup: int,
    module_type: type = PrequelModule,
    steps: list | None = None,
) -> float:
    """prequel's own Trainer (training.run.build_trainer), no loggers, no checkpoints; steady-state
    tokens/s of its module, or of a `module_type` (initialised alike: the same seed) in its place.
    Each timed step's (tokens, seconds) is appended to `steps`, if given."""
    set_determinism(config)
    clock = Clock(warmup, steps)
    with tempfile.TemporaryDirectory() as tmp:
        module, data, trainer = build_trainer(config, tape, vocab_size, callbacks + [clock], [], Path(tmp))
        if module_type is not PrequelModule:
            set_determinism(config)  # the same initial weights as the module built above
            module = module_type(replace(config, model=replace(config.model, head_chunk=0)), vocab_size)
            module.attach(tape)
            if config.trainer.compile:
                module.model.compile()
        trainer.fit(module, data)
    return clock.tokens_per_s()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_tokens_per_s(config: Config, tape: Tape, vocab_size: int, warmup: int, steps: list | None = None) -> float:
    """The same training in a plain nanoGPT-style loop: no Trainer, no callbacks, no logging; the
    batches copied to a GPU without blocking, the device synchronised at the timed window's ends.
    Each timed step's (tokens, seconds) is appended to `steps`, if given (on a GPU: host time)."""
    set_determinism(config)
    device = torch.device(device_of(config.trainer.accelerator))
    plain = replace(config, model=replace(config.model, head_chunk=0))  # nanoGPT's head: the whole logits
    module = PrequelModule(plain, vocab_size).to(device)  # for its GPT and configure_optimizers
    model = module.model.train()
    if config.trainer.compile:
        model.compile()
    optimizers = module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=config.trainer.precision == "bf16-mixed")
    batches = plan_batches(
        len(tape), config.model.block_size, config.data.batch_size, config.data.curriculum, config.seed
    )
    tokens, t0 = 0, None
    for i, spans in enumerate(batches):
        x, y = tape.batch(spans)
        if device.type == "cuda":
            x, y = (t.pin_memory().to(device, non_blocking=True) for t in (x, y))
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        loss.backward()
        if config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if i == warmup - 1:
            sync(device)
            t0 = t1 = time.perf_counter()
        elif i >= warmup:
            n = int(spans[:, 1].sum())
            tokens += n
            if steps is not None:
                now = time.perf_counter()
                steps.append((n, now - t1))
                t1 = now
    sync(device)
    return tokens / (time.perf_counter() - t0)


def median_step_rate(steps: list[tuple[int, float]]) -> float:
    """Tokens/s of the median step: blind to the slow steps that a busy machine adds at random (and
    to the periodic ones too, a log step's; the whole-run rate counts those)."""
    return median([tokens / seconds for tokens, seconds in steps])


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
