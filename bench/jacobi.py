"""Would Jacobi (speculative) decoding make Bob's `full` procedure cheaper? A simulation.

Bob's `full` procedure runs one full-shape forward per column: column t's logits are exact
once every input before t is. Jacobi decoding feeds the forward a guessed continuation (each
position's argmax from the previous forward) and keeps every column up to the first wrong
guess: bitwise safe by causality. This script trains `--config` on the first `--bytes` of the
bundled data (no stream), then, for `--batches` batches from the end of that run (the model as
it was), counts the forwards Bob would need per batch:

- column-major (the stream's order today: one coder, column t of every row, then t + 1): Bob
  may decode (t, r) only when all of (t, < r) and (< t, *) are decoded and (t, r) is valid;
- row-wise (one coder per row, a format change): each row advances on its own, the batch
  needs as many forwards as its slowest row.

Prints forwards per batch against `block_size` (what the procedure runs today).

    python bench/jacobi.py [--config configs/small.yaml] [--bytes 200000] [--batches 20]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prequel.alice.session import train  # noqa: E402
from prequel.checks.settings import load_config  # noqa: E402
from prequel.training.curriculum import plan_batches  # noqa: E402
from prequel.training.data import IGNORE, Tape  # noqa: E402
from prequel.training.module import PrequelModule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def forwards_needed(model, tape: Tape, spans: torch.Tensor, column_major: bool) -> int:
    _, truth = tape.batch(spans)
    known = truth == IGNORE  # (B, L): decoded (or absent)
    guess = torch.where(known, truth, 0)
    forwards = 0
    while not known.all():
        logits = model(tape.inputs(guess))
        forwards += 1
        # column t of row r is exact when every target before t in row r is decoded, i.e. the
        # guesses there were right (a wrong guess is decoded and fixed, but ends the run)
        right = (guess == truth) | (truth == IGNORE)
        valid = torch.cat([torch.ones_like(right[:, :1]), right[:, :-1].cumprod(1).bool()], 1)
        if column_major:  # decode (t, r) in order while valid; stop at the first (t, r) that is not
            order = (~known).T.nonzero()  # undecoded (t, r) pairs, column-major
            for t, r in order.tolist():
                if not valid[r, t]:
                    break
                known[r, t], guess[r, t] = True, truth[r, t]
        else:
            fresh = valid & ~known
            known |= fresh
            guess = torch.where(fresh, truth, guess)
        guess = torch.where(known, truth, logits.argmax(-1))
    return forwards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--bytes", type=int, default=200_000)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        text.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[: args.bytes])
        config = load_config(
            args.config,
            [
                "--data.path",
                str(text),
                "--run_dir",
                str(Path(tmp) / "run"),
                "--stream.enabled",
                "false",
                "--logging.wandb",
                "false",
                "--logging.csv",
                "false",
                "--logging.plot",
                "false",
                "--logging.progress_bar",
                "false",
            ],
        )
        summary = train(config)
        ckpt = torch.load(Path(tmp) / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    module = PrequelModule(config, vocab_size=256)
    module.load_state_dict(ckpt["state_dict"])
    tokens = torch.tensor(list((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[: args.bytes]))
    tape = Tape(tokens, bos_id=256)
    batches = plan_batches(len(tokens), config.model.block_size, config.data.batch_size, "sequential", config.seed)
    chosen = batches[-args.batches :]
    L = config.model.block_size
    for column_major in (True, False):
        counts = [forwards_needed(module.model, tape, spans, column_major) for spans in chosen]
        name = "column-major (today's order)" if column_major else "row-wise sub-streams"
        print(
            f"{name:<30} forwards per batch: mean {sum(counts) / len(counts):5.1f}, "
            f"min {min(counts)}, max {max(counts)}  (block_size {L}; speed-up {L * len(counts) / sum(counts):.2f}x)"
        )
    print(f"model after {args.bytes:,} bytes: {summary['code/data_bpb']:.3f} Σ bpb")


if __name__ == "__main__":
    main()
