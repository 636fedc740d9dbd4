"""What portable kernels cost (issue 14): training throughput, native vs portable, same config.

Each measurement is a fresh process (the pins act when torch starts) that trains the config's
model on a prefix of its corpus through prequel's own Trainer and reports steady-state tokens/s
(common.lightning_tokens_per_s). The modes alternate `--repeats` times; prints the medians and
the ratio portable / native (the default is portable only where this is ≥ 0.90).

    python bench/kernels_speed.py [--config configs/small.yaml] [--tokens 200000] [--repeats 3]
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

from common import bench_config, bench_parser, code_length_callback, corpus_prefix, lightning_tokens_per_s, median

from prequel.checks.machine import cpu_model
from prequel.training import environment


def child(args, overrides: list[str]) -> None:
    config = bench_config(args.config, overrides + ["--trainer.kernels", args.child])
    tokenizer, _, tape = corpus_prefix(config, args.tokens)
    rate = lightning_tokens_per_s(
        config, tape, tokenizer.vocab_size, [code_length_callback(config, tokenizer, len(tape))], args.warmup
    )
    print(f"tokens/s {rate:.1f}")


def measure(mode: str, argv: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in environment.KERNEL_VARIABLES}
    if mode == "portable":
        env |= environment.PORTABLE_PINS
    r = subprocess.run([sys.executable, __file__, *argv, "--child", mode], capture_output=True, text=True, env=env)
    lines = [line for line in r.stdout.splitlines() if line.startswith("tokens/s ")]
    if r.returncode or not lines:
        raise SystemExit(f"{mode} run failed:\n{r.stderr[-2000:]}")
    return float(lines[-1].split()[1])


def main() -> None:
    parser = bench_parser("Training throughput with native vs portable kernels.")
    parser.add_argument("--tokens", type=int, default=200_000, help="corpus prefix to train on (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=20, help="batches left out of the timing (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode, alternating (default: %(default)s)")
    parser.add_argument("--child", choices=environment.KERNEL_MODES, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.child:
        return child(args, overrides)
    argv = sys.argv[1:]
    rates: dict[str, list[float]] = {"native": [], "portable": []}
    for _ in range(args.repeats):
        for mode in rates:
            rates[mode].append(measure(mode, argv))
            print(f"  {mode:<8} {rates[mode][-1]:>10,.0f} tokens/s", flush=True)
    native, portable = median(rates["native"]), median(rates["portable"])
    print(f"{Path(args.config).name}, {args.tokens:,} tokens, {cpu_model()}")
    print(f"native   {native:>10,.0f} tokens/s (median of {args.repeats})")
    print(f"portable {portable:>10,.0f} tokens/s (median of {args.repeats})")
    print(f"ratio portable / native: {portable / native:.3f}")


if __name__ == "__main__":
    main()
