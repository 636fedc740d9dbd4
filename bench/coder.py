"""The stream's coder at LLM scale (issue 28): host tokens/s by vocabulary and batch, and the device's share.

    python bench/coder.py [--vocab 256 4096 32768 50257 131072] [--steps 512 65536] [--d 128 768] [--repeats 3]

For each vocabulary V and tokens a step (a step of 512 tokens is 8 rows × 64 columns; of 65,536,
64 × 1,024):

* host encode tokens/s: `Encoder.add` of a step's intervals and `Encoder.words` (the rANS pass Alice
  runs when a segment is sealed), per step;
* host decode tokens/s: per column, `Decoder.slots` (what goes to the device) and `Decoder.advance`
  (the rANS step with what comes back), the host's whole share of a decode;
* bits a token, and what they exceed the ideal Σ -log2 p by, a token, less the lanes' 64-bit final states;
* device (here: this CPU) µs per token: `logit_intervals` (Alice's quantisation from logits) and
  `lookup` (Bob's: softmax, quantisation, searchsorted) next to the LM head's forward matmul
  (d × V) at each `--d`.

The intervals are real: 256 rows of random logits quantised at V, with targets drawn from them,
tiled to the step's size (the host's cost depends on V only through the intervals' values).
Goals (issue 28, 2 cores): encode >= 5 M tokens/s, decode >= 1 M tokens/s, each within 2x across V.
"""

import argparse
import os
import time

import numpy as np
import torch

from prequel.alice.encoder import Encoder
from prequel.training.coding import Decoder, logit_intervals, lookup

SHAPES = {512: (8, 64), 65536: (64, 1024)}  # tokens a step -> rows, columns
DISTINCT_ROWS = 256


def step_intervals(vocab: int, rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """(rows, cols, 2) intervals of targets drawn from random distributions at `vocab`, and their
    ideal code length Σ -log2 p (bits, float64 of the float32 softmax the coder quantises)."""
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(DISTINCT_ROWS, vocab, generator=g)
    probs = torch.softmax(logits, -1)
    targets = torch.multinomial(probs, 1, generator=g)[:, 0]
    spans = logit_intervals(logits, targets).numpy()
    ideal = -probs.gather(-1, targets[:, None])[:, 0].double().log2().numpy()
    pick = torch.randint(0, DISTINCT_ROWS, (rows * cols,), generator=g).numpy()
    return spans[pick].reshape(rows, cols, 2), float(ideal[pick].sum())


def host_rates(spans: np.ndarray, repeats: int) -> tuple[float, float, int]:
    """Best-of-`repeats` host encode and decode tokens/s for one step of intervals (B, L, 2)."""
    rows, cols, _ = spans.shape
    column_major = np.ascontiguousarray(spans.transpose(1, 0, 2)).reshape(-1, 2)
    lanes = np.tile(np.arange(rows, dtype=np.int64), cols)
    one_column = np.arange(rows, dtype=np.int64)
    inner = max(1, (1 << 17) // (rows * cols))  # steps a timing: a small step alone is too short to time
    best_encode = best_decode = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            encoder = Encoder()
            encoder.add(lanes, column_major)
            words = encoder.words()
        t1 = time.perf_counter()
        for _ in range(inner):
            decoder = Decoder(words, rows)
            for t in range(cols):
                decoder.slots(one_column)
                decoder.advance(one_column, spans[:, t, 0], spans[:, t, 1])
        t2 = time.perf_counter()
        assert decoder.exhausted()
        best_encode, best_decode = min(best_encode, t1 - t0), min(best_decode, t2 - t1)
    n = rows * cols * inner
    return n / best_encode, n / best_decode, len(words)


def device_us_per_token(vocab: int, d: list[int], repeats: int) -> dict:
    """µs a token of the quantisation (both sides) and of the LM head's forward at each d."""
    rows = max(8, min(512, (1 << 24) // vocab))
    g = torch.Generator().manual_seed(vocab)
    logits = 3.0 * torch.randn(rows, vocab, generator=g)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    slots = torch.randint(0, 1 << 31, (rows,), generator=g)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e6 * min(times) / rows

    out = {
        "encode": best(lambda: logit_intervals(logits, targets)),
        "decode": best(lambda: lookup(torch.softmax(logits, -1), slots)),
    }
    for width in d:
        x, head = torch.randn(rows, width, generator=g), torch.randn(vocab, width, generator=g)
        out[f"head{width}"] = best(lambda x=x, head=head: x @ head.T)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[256, 4096, 32768, 50257, 131072])
    parser.add_argument("--steps", type=int, nargs="+", default=[512, 65536], choices=sorted(SHAPES))
    parser.add_argument("--d", type=int, nargs="+", default=[128, 768], help="LM head widths to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs\n")
    heads = "".join(f" {'head d=' + str(w) + ' µs':>14}" for w in args.d)
    print(
        f"{'V':>7} {'tok/step':>8} {'encode tok/s':>13} {'decode tok/s':>13} {'bits/tok':>9} {'- ideal':>11}"
        f" | {'quantise µs/tok (Alice)':>23} {'lookup µs/tok (Bob)':>19}{heads}"
    )
    rates = {}  # (side, tokens a step) -> tok/s at each V
    for vocab in args.vocab:
        device = device_us_per_token(vocab, args.d, args.repeats)
        for step in args.steps:
            spans, ideal = step_intervals(vocab, *SHAPES[step])
            encode, decode, words = host_rates(spans, args.repeats)
            rows = SHAPES[step][0]  # lanes: each has a 64-bit final state
            excess = (16 * words - 64 * rows - ideal) / step
            rates.setdefault(("encode", step), []).append(encode)
            rates.setdefault(("decode", step), []).append(decode)
            head_cols = "".join(f" {device[f'head{w}']:>14.3f}" for w in args.d)
            print(
                f"{vocab:>7} {step:>8} {encode:>13,.0f} {decode:>13,.0f} {16 * words / step:>9.3f} {excess:>+11.2e}"
                f" | {device['encode']:>23.3f} {device['decode']:>19.3f}{head_cols}"
            )
    print()
    for (side, step), found in rates.items():
        goal, low, high = {"encode": 5e6, "decode": 1e6}[side], min(found), max(found)
        print(
            f"{side} at {step:,} tokens a step: slowest {low:,.0f} tok/s (goal {goal:,.0f}: "
            f"{'met' if low >= goal else 'NOT met'}), fastest / slowest across V {high / low:.2f} (goal <= 2)"
        )


if __name__ == "__main__":
    main()
