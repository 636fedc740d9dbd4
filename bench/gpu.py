"""Training throughput at GPT-2 small's size (issue 30): prequel against a bare PyTorch loop.

The same model (configs/gpt2-small.yaml by default: its GPT, batches, AdamW groups, clipping,
precision and compile), timed three ways over the same `--steps` steps after `--warmup`:

  (a) bare: a nanoGPT-style loop: forward, F.cross_entropy on the whole logits, backward, clip,
      AdamW, schedule; the batches copied to the device without blocking; no Trainer.
  (b) prequel's Trainer (training.run.build_trainer) with the CodeLength callback, stream off.
  (c) the same with the stream on (StreamEncoder: intervals coded on its background thread).

Each prints tokens/s and model FLOPs utilisation (MFU: 6·N + 12·L·T·C FLOPs a token, nanoGPT's
count, over the GPU's dense bf16 peak, or --peak-tflops). The device is synchronised at the start
and end of each timed window only. Goals: (b)/(a) >= 0.95, (c)/(a) >= 0.90. Then `verify` (checked
single steps) of a `--verify-steps` run, as a ratio to training it (bench/stream_speed.py (b)).

    python bench/gpu.py [--steps 50] [--warmup 10] [--verify-steps 10] [--config configs/gpt2-small.yaml] [--x.y v]

Without a GPU it runs the same code on the CPU (`--trainer.accelerator cpu`, a small config):
tests/test_bench.py does, to keep it working.
"""

import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from common import (
    bare_tokens_per_s,
    bench_config,
    bench_parser,
    code_length_callback,
    corpus_prefix,
    median,
    print_environment,
    sync,
)
from stream_speed import decode_train_ratio

from prequel.alice.encoder import StreamEncoder
from prequel.alice.fit import stream_header
from prequel.training.data import Tape
from prequel.training.module import PrequelModule
from prequel.training.run import build_trainer, set_determinism

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}  # dense


class SyncedClock(L.Callback):
    """Seconds and tokens of the batches after `warmup`, the device synchronised at both ends only."""

    def __init__(self, warmup: int):
        self.warmup, self.tokens, self.t0, self.seconds = warmup, 0, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.warmup - 1:
            sync(pl_module.device)
            self.t0 = time.perf_counter()
        elif batch_idx >= self.warmup:
            self.tokens += int(batch["spans"][:, 1].sum())

    def on_train_end(self, trainer, pl_module) -> None:
        sync(pl_module.device)
        if self.t0 is None or not self.tokens:
            raise SystemExit(f"no batch after the {self.warmup} warm-up batches: give more steps")
        self.seconds = time.perf_counter() - self.t0


def prequel(config, tape: Tape, tokenizer, warmup: int, stream: bool) -> float:
    """(b) and (c): tokens/s of prequel's Trainer, with or without the stream."""
    set_determinism(config)
    callbacks = [code_length_callback(config, tokenizer, len(tape))]
    if stream:
        header = stream_header(config, tokenizer, len(tape))
        callbacks.append(StreamEncoder(tape, config.stream.checksum_every, config.stream.procedure, header=header))
    clock = SyncedClock(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        module, data, trainer = build_trainer(config, tape, tokenizer.vocab_size, callbacks + [clock], [], Path(tmp))
        trainer.fit(module, data)
    return clock.tokens / clock.seconds


def flops_per_token(config, vocab_size: int) -> float:
    m = config.model
    params = sum(p.numel() for p in PrequelModule(config, vocab_size).model.parameters())
    return 6 * params + 12 * m.n_layer * m.block_size * m.n_embd


def peak_flops(args, config) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if config.trainer.accelerator == "cpu" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def main() -> None:
    parser = bench_parser("GPU training throughput: a bare loop, prequel without and with the stream.")
    parser.set_defaults(config="configs/gpt2-small.yaml")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first: compile (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each row (default: %(default)s)")
    parser.add_argument("--verify-steps", type=int, default=10, help="steps of the verify run; 0: skip")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: by GPU name)")
    args, overrides = parser.parse_known_args()
    if min(args.steps, args.warmup, args.repeats) < 1 or args.verify_steps < 0:
        parser.error("--steps, --warmup and --repeats must be >= 1, --verify-steps >= 0")
    config = bench_config(args.config, ["--stream.enabled", "false"] + overrides)
    if config.optim.schedule != "constant" or config.data.context or config.data.curriculum != "sequential":
        parser.error("the bare loop here reads sequential batches without context at a constant learning rate")
    print_environment(config)
    step_tokens = config.data.batch_size * config.model.block_size
    n_tokens = (args.warmup + args.steps) * step_tokens
    tokenizer, tokens, tape = corpus_prefix(config, n_tokens)
    vocab = tokenizer.vocab_size
    per_token, peak = flops_per_token(config, vocab), peak_flops(args, config)
    print(f"{n_tokens:,} tokens: {args.warmup} warm-up + {args.steps} timed steps of {step_tokens:,} tokens\n")

    rows = {"(a) bare loop": [], "(b) prequel, no stream": [], "(c) prequel + stream": []}
    for _ in range(args.repeats):
        rows["(a) bare loop"].append(bare_tokens_per_s(config, tape, vocab, args.warmup))
        rows["(b) prequel, no stream"].append(prequel(config, tape, tokenizer, args.warmup, stream=False))
        rows["(c) prequel + stream"].append(prequel(config, tape, tokenizer, args.warmup, stream=True))
    base = median(rows["(a) bare loop"])
    print(f"{'':24} {'tokens/s':>12} {'MFU':>7} {'/ (a)':>7}")
    for name, rates in rows.items():
        rate = median(rates)
        mfu = f"{rate * per_token / peak:.1%}" if peak else "n/a"
        print(f"{name:24} {rate:>12,.0f} {mfu:>7} {rate / base:>7.3f}")
    print(
        f"\ngoals: (b)/(a) >= 0.95, (c)/(a) >= 0.90; {per_token:.3g} FLOPs a token"
        + ("" if peak else " (MFU needs --peak-tflops off a known GPU)")
    )
    if args.verify_steps:
        print()
        decode_train_ratio(config, args.verify_steps * step_tokens, median(rows["(c) prequel + stream"]), "(d)")


if __name__ == "__main__":
    main()
