"""Curriculum orders and tokenizers compared by what they are for: the code length.

Each variant trains one first pass from scratch (`prequel.alice.session.train`, the same code as
`train.py`, stream off: the ideal code length Σ + n + |f| is what is compared; the stream adds
only a few bits) on the same bytes, and reports bits per byte *including* what its choice costs
in |f|: the transmitted order (`difficulty`) and the trained tokenizer (`bpe`). Variants:

    sequential, shuffle, length_warmup, difficulty   (byte tokenizer)
    bpe                                              (BPE at --vocab_size, sequential)

    python bench/curriculum_sweep.py [--config configs/small.yaml] [--max_bytes 200000] [--max_steps N]
                               [--variants sequential,bpe] [--vocab_size 1024] [--data.pacing root ...]

The full default (tinyshakespeare, small.yaml, five variants) takes about 5 × 3 minutes on 2
CPU cores. `--max_bytes` codes a prefix of the corpus (a full, fair pass on less data);
`--max_steps` stops each run early, so each covers only the bytes its order reached first
(different bytes per order: a rough comparison only). Other options override the config.
"""

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

from common import bench_config, print_environment

from prequel.alice.corpus import read_corpus
from prequel.alice.session import train

VARIANTS = {
    "sequential": ["--data.curriculum", "sequential"],
    "shuffle": ["--data.curriculum", "shuffle"],
    "length_warmup": ["--data.curriculum", "length_warmup"],
    "difficulty": ["--data.curriculum", "difficulty"],
    "bpe": ["--data.curriculum", "sequential", "--data.tokenizer", "bpe"],
}


def run_variant(
    config_path: str, name: str, data_path: Path, run_dir: Path, overrides: list[str], vocab_size: int
) -> dict:
    extra = VARIANTS[name] + (["--data.vocab_size", str(vocab_size)] if name == "bpe" else [])
    config = bench_config(
        config_path,
        ["--data.path", str(data_path), "--run_dir", str(run_dir), "--stream.enabled", "false", *extra, *overrides],
    )
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # train() prints its own table; ours is below
        summary = train(config)
    summary["seconds"] = time.perf_counter() - started
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--max_bytes", type=int, help="code only this prefix of the corpus (default: all of it)")
    parser.add_argument("--max_steps", type=int, help="stop each run after this many steps (a partial pass)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--vocab_size", type=int, default=1024, help="BPE vocabulary for the bpe variant")
    args, overrides = parser.parse_known_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.max_steps:
        overrides += ["--trainer.max_steps", str(args.max_steps)]

    config = bench_config(args.config, overrides)
    print_environment(config)
    data = read_corpus(config.data.path)[: args.max_bytes]
    print(f"corpus: {config.data.path or 'bundled tinyshakespeare'}, {len(data):,} bytes\n")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "corpus.bin"
        data_path.write_bytes(data)
        for name in names:
            s = run_variant(args.config, name, data_path, Path(tmp) / name, overrides, args.vocab_size)
            rows.append((name, s))
            print(f"  {name:<14} {s['code/bpb']:.4f} bpb in {s['seconds']:.0f} s", flush=True)

    base = dict(rows).get("sequential")
    print("\nbits per byte of the first pass; total = |f| (all parts) + n + Σ, over the bytes covered")
    header = (
        f"{'variant':<14} {'tokens':>9} {'bytes':>9} {'Σ bpb':>7} {'n bpb':>7} {'order bits':>10} "
        f"{'tokenizer bits':>14} {'total bpb':>9} {'vs sequential':>13} {'seconds':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, s in rows:
        delta = f"{s['code/bpb'] - base['code/bpb']:+.4f}" if base and s["data/bytes"] == base["data/bytes"] else ""
        print(
            f"{name:<14} {s['data/tokens']:>9,} {s['data/bytes']:>9,} {s['code/data_bpb']:>7.4f} "
            f"{s['code/n_bits'] / max(s['data/bytes'], 1):>7.4f} {s['code/f_bits/order']:>10,} "
            f"{s['code/f_bits/tokenizer']:>14,} {s['code/bpb']:>9.4f} {delta:>13} {s['seconds']:>7.0f}"
        )
    if any(not s["data/complete"] for _, s in rows):
        print("\nPARTIAL passes (--max_steps): each row covers only the bytes its order reached; compare with care.")
    baselines = rows[0][1]
    print(
        f"\nsame bytes: gzip {baselines['baseline/gzip_bpb']:.4f}, bzip2 {baselines['baseline/bzip2_bpb']:.4f}, "
        f"xz {baselines['baseline/xz_bpb']:.4f} bpb (of the first row's bytes)"
    )


if __name__ == "__main__":
    main()
