"""Wall time of checking a run: `verify` (one replay) against `verify --jobs N` (prequel/verify/audit.py).

Trains `--config` on the first `--bytes` of the bundled data with a checkpoint every
`--checkpoint-every` steps (each one starts a stretch), then times, each as a user runs it (a
separate `train.py` process, start-up included): verify, and the audit with every N of `--jobs`
(threads per job: the encoder's // N). Prints seconds and the ratio to training.

    python bench/audit_speed.py [--config configs/small.yaml] [--bytes 200000] [--checkpoint-every 100] [--jobs 1,2]

Run it alone: processes that share cores slow each other (see README, "Benchmarks").
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(*args: str) -> float:
    started = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "train.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    if r.returncode:
        sys.exit(f"train.py {' '.join(map(str, args))} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--bytes", type=int, default=200_000)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--jobs", default="1,2", help="comma-separated N for --jobs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        text, run_dir = Path(tmp) / "text.txt", Path(tmp) / "run"
        text.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[: args.bytes])
        train_s = timed(
            "--config",
            args.config,
            "--data.path",
            text,
            "--run_dir",
            run_dir,
            "--trainer.checkpoint_every_n_steps",
            args.checkpoint_every,
            "--logging.wandb",
            "false",
            "--logging.plot",
            "false",
            "--logging.progress_bar",
            "false",
        )
        stretches = len(list((run_dir / "checkpoints").glob("step=*.ckpt")))
        print(
            f"{args.config} on {args.bytes:,} bytes, a checkpoint every {args.checkpoint_every} steps: "
            f"{stretches} stretches, {os.cpu_count()} cores"
        )
        print(f"{'command':<28} {'seconds':>8} {'/ train':>8}")
        print(f"{'train':<28} {train_s:>8.1f} {1:>8.2f}")
        verify_s = timed("verify", run_dir)
        print(f"{'verify':<28} {verify_s:>8.1f} {verify_s / train_s:>8.2f}")
        for jobs in map(int, args.jobs.split(",")):
            audit_s = timed("verify", run_dir, "--jobs", jobs)
            print(f"{f'verify --jobs {jobs}':<28} {audit_s:>8.1f} {audit_s / train_s:>8.2f}")


if __name__ == "__main__":
    main()
