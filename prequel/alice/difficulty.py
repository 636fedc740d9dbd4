"""Alice's side of the orders (training/curriculum.py): the levels a `difficulty` order
transmits, what they cost in |f|, and the size of a plan before it is built (memory checks)."""

import base64
import math
import zlib

import numpy as np
import torch


def difficulty_labels(chunks, score: str, levels: int) -> torch.Tensor:
    """The encoder's side of `difficulty`: rank chunks by a score (lower = easier; ties by
    position) and cut the ranking into `levels` equal parts. Level sizes then depend only on
    the number of chunks, which the decoder knows, so only the assignment must be sent.

    - ``zlib``: compressed size / raw size (repetitive text is easy);
    - ``length``: bytes in the chunk (with BPE, many bytes per token = common words)."""
    if score == "zlib":
        scores = np.fromiter((len(zlib.compress(c, 9)) / max(len(c), 1) for c in chunks), dtype=np.float64)
    elif score == "length":
        scores = np.fromiter((len(c) for c in chunks), dtype=np.float64)
    else:
        raise ValueError(f"data.difficulty_score: unknown score {score!r} (known: zlib, length)")
    ranking = np.argsort(scores, kind="stable")  # (chunks may be a generator: one chunk in memory at a time)
    n = len(scores)
    labels = np.empty(n, dtype=np.int64)
    labels[ranking] = np.arange(n) * min(levels, n) // max(n, 1)
    return torch.from_numpy(labels)


def order_bits(labels: torch.Tensor | None) -> int:
    """Bits to transmit the levels with an enumerative code: ceil(log2(N! / prod n_k!))."""
    if labels is None or len(labels) == 0:
        return 0
    counts = torch.bincount(labels).tolist()
    nats = math.lgamma(len(labels) + 1) - sum(math.lgamma(c + 1) for c in counts)
    return math.ceil(nats / math.log(2) - 1e-9)


def labels_to_header(labels: torch.Tensor) -> str:
    """A compact, JSON-safe form for the stream header (what is *counted* is `order_bits`)."""
    return base64.b64encode(zlib.compress(labels.numpy().astype("<u4").tobytes(), 9)).decode()


def plan_size(
    n_tokens: int, seq_len: int, batch_size: int, curriculum: str, pacing_start: float = 0.125, replay_steps: int = 0
) -> tuple[int, int]:
    """(chunks, steps) that `plan_batches` and `with_replay` would build, bounded without building
    them: what a header's sizes commit the decoder to, checked before it plans (config.check_memory).
    Only `length_warmup` cuts chunks shorter than `seq_len`, never below ``pacing_start * seq_len``."""
    shortest = max(1, round(seq_len * pacing_start)) if curriculum == "length_warmup" else seq_len
    chunks = -(-n_tokens // shortest)
    return chunks, -(-chunks // batch_size) * (1 + replay_steps)
