"""Compression strength on the shared corpora: prequel's total code length next to the classics.

    python bench/compress.py [--config configs/compress.yaml] [--files tinyshakespeare book1]
                             [--verify] [--markdown docs/results.md] [--some.config.key value ...]

For each file: train the preset on it (one pass, stream on), then optionally `verify` the stream
in this process (decode by replaying training). Prints bits per byte: the total a receiver
really needs (|f| + the arithmetic-coded stream), Σ alone, |f| alone, and gzip -9 / bzip2 -9 /
xz -9e of the same bytes measured in the same run, beside paq8px's published figure.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prequel.alice.session import train  # noqa: E402
from prequel.checks.settings import load_config  # noqa: E402
from prequel.verify.verifier import verify  # noqa: E402

CORPORA = ROOT.parent / "shared" / "corpora"
FILES = {
    "tinyshakespeare": "tinyshakespeare.txt",
    "alice29": "canterbury/alice29.txt",
    "asyoulik": "canterbury/asyoulik.txt",
    "lcet10": "canterbury/lcet10.txt",
    "plrabn12": "canterbury/plrabn12.txt",
    "book1": "calgary/book1",
    "bible": "canterbury-large/bible.txt",
    "world192": "canterbury-large/world192.txt",
}
# paq8px v216 -12L (trained from scratch, no dictionary): ../shared/corpora/BASELINES.md §2a.
PAQ8PX = {"alice29": 1.729, "asyoulik": 2.009, "lcet10": 1.477, "plrabn12": 1.938, "book1": 1.889}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "compress.yaml"))
    parser.add_argument(
        "--files", nargs="+", default=["tinyshakespeare", "book1", "alice29", "plrabn12"], choices=sorted(FILES)
    )
    parser.add_argument("--verify", action="store_true", help="decode every stream and check the bytes")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench-compress"), help="where the runs go")
    parser.add_argument("--markdown", help="also write the table to this file")
    args, overrides = parser.parse_known_args()

    rows = []
    for name in args.files:
        path = CORPORA / FILES[name]
        if not path.exists():
            sys.exit(f"missing corpus {path}: this bench reads ../shared/corpora")
        run_dir = Path(args.runs) / name
        config = load_config(
            args.config,
            [
                "--data.path",
                str(path),
                "--run_dir",
                str(run_dir),
                "--logging.wandb",
                "false",
                "--logging.progress_bar",
                "false",
                *overrides,
            ],
        )
        started = time.perf_counter()
        s = train(config)
        seconds = time.perf_counter() - started
        decoded = ""
        if args.verify:
            report = verify(run_dir)
            decoded = f"yes ({report['seconds']:.0f} s)" if report["complete"] else "partial"
        n = s["data/bytes"]
        rows.append(
            {
                "file": name,
                "bytes": f"{n:,}",
                "seconds": f"{seconds:.0f}",
                "total bpb (|f| + stream)": f"{s['code/stream_total_bpb']:.3f}",
                "Σ bpb": f"{s['code/data_bpb']:.3f}",
                "|f| bpb": f"{s['code/f_bits'] / n:.3f}",
                "gzip": f"{s['baseline/gzip_bpb']:.3f}",
                "bzip2": f"{s['baseline/bzip2_bpb']:.3f}",
                "xz": f"{s['baseline/xz_bpb']:.3f}",
                "paq8px -12L": f"{PAQ8PX[name]:.3f}" if name in PAQ8PX else "—",
                "verified": decoded or "not run",
            }
        )
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if h == "file" else "---:" for h in header) + "|"]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(f"`{' '.join(sys.argv)}`\n\n{table}\n")


if __name__ == "__main__":
    main()
