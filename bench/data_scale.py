"""Memory flat in corpus size: peak RSS of the same training run on a small and a large corpus.

Writes two corpora (tinyshakespeare repeated, then cut: --small_mb and --large_mb), and for each
runs `train.py` with the config for --steps steps twice in a fresh cache: the first run tokenises
into token shards, the second reads them from the cache. Each run is a child process; its peak
RSS is the kernel's (wait4's ru_maxrss). Then tokenise MB/s: bytes (from the first runs) and a BPE
learnt on the small corpus (learning and encoding timed apart). Time it alone.

    python bench/data_scale.py                      # 10 MB against 1,000 MB
    python bench/data_scale.py --large_mb 200 --steps 50
"""

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prequel.checks.machine import cpu_model  # noqa: E402

SOURCE = ROOT / "data" / "tinyshakespeare.txt"


def write_corpus(path: Path, megabytes: float) -> int:
    """`megabytes` MB of tinyshakespeare repeated, a copy at a time (never held whole)."""
    text, left = SOURCE.read_bytes(), int(megabytes * 1e6)
    with open(path, "wb") as f:
        while left > 0:
            f.write(text[:left])
            left -= len(text)
    return path.stat().st_size


def run(config: str, corpus: Path, steps: int, run_dir: Path, cache: Path) -> dict:
    """One training run as a child process: its peak RSS, wall time and tokenising line."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", config, "--data.path", str(corpus)]
    cmd += ["--trainer.max_steps", str(steps), "--run_dir", str(run_dir), "--logging.wandb", "false"]
    cmd += ["--logging.plot", "false", "--logging.progress_bar", "false"]
    env = {**os.environ, "PREQUEL_CACHE": str(cache), "OMP_WAIT_POLICY": "PASSIVE"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"train.py failed on {corpus}:\n{stderr[-3000:]}")
    tokenised = re.search(r"prequel: ([\d,]+) tokens in \d+ shard\(s\), ([\d.]+) s \(([\d.]+) MB/s\)", stderr)
    return {
        "rss_mb": usage.ru_maxrss / 1024,  # (Linux: kilobytes)
        "seconds": seconds,
        "tokenise_s": float(tokenised[2]) if tokenised else None,
        "tokenise_mb_s": float(tokenised[3]) if tokenised else None,
    }


def bpe_rates(corpus: Path, vocab_size: int, cache: Path) -> tuple[float, float]:
    """MB/s of learning a BPE on `corpus` and of encoding it into shards with that BPE."""
    os.environ["PREQUEL_CACHE"] = str(cache)
    from prequel.alice.shards import open_corpus, token_shards
    from prequel.alice.tokenizing import train_bpe

    data = open_corpus(str(corpus))
    t0 = time.perf_counter()
    bpe = train_bpe(data, vocab_size)
    t1 = time.perf_counter()
    token_shards(data, bpe)
    t2 = time.perf_counter()
    return data.size / 1e6 / (t1 - t0), data.size / 1e6 / (t2 - t1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"))
    parser.add_argument("--small_mb", type=float, default=10)
    parser.add_argument("--large_mb", type=float, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--bpe_vocab", type=int, default=4096)
    args = parser.parse_args()
    if min(args.small_mb, args.large_mb, args.steps) <= 0:
        parser.error("--small_mb, --large_mb and --steps must be > 0")
    print(f"{Path(args.config).name}, {args.steps} steps a run, {cpu_model()}, peak RSS of each child process")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="prequel-data-scale-") as tmp:
        tmp = Path(tmp)
        for name, mb in (("small", args.small_mb), ("large", args.large_mb)):
            corpus = tmp / f"{name}.txt"
            size = write_corpus(corpus, mb)
            first = run(args.config, corpus, args.steps, tmp / f"{name}-1", tmp / "cache")
            second = run(args.config, corpus, args.steps, tmp / f"{name}-2", tmp / "cache")
            rows[name] = (size, first, second)
            print(
                f"{size / 1e6:9,.1f} MB: first run {first['rss_mb']:7,.1f} MB peak RSS, {first['seconds']:6.1f} s "
                f"(tokenised at {first['tokenise_mb_s']:,.1f} MB/s, bytes); cached run {second['rss_mb']:7,.1f} MB, "
                f"{second['seconds']:6.1f} s"
            )
        ratio_first = rows["large"][1]["rss_mb"] / rows["small"][1]["rss_mb"]
        ratio_cached = rows["large"][2]["rss_mb"] / rows["small"][2]["rss_mb"]
        print(f"peak RSS large / small: {ratio_first:.3f} first runs, {ratio_cached:.3f} cached runs (goal <= 1.2)")
        learn, encode = bpe_rates(tmp / "small.txt", args.bpe_vocab, tmp / "cache")
        print(
            f"BPE ({args.bpe_vocab:,} tokens) on the small corpus: learn {learn:,.1f} MB/s, tokenise {encode:,.1f} MB/s"
        )
    print(f"(this process's own peak: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.1f} MB)")


if __name__ == "__main__":
    main()
