"""The orders only some runs use (training/curriculum.py has the natural ones and `plan_batches`):
a seeded shuffle, short chunks first, and easy chunks first by transmitted difficulty levels. Only
a run configured with one has this module in f (prequel/program.py).
"""

import base64
import math
import zlib

import numpy as np
import torch

from prequel.training.curriculum import ChunkBatches, chunk_spans

STEP_STAGES = 4  # `step` pacing: this many equal jumps
LEVEL_BYTES = (
    4  # a transmitted level is stored as a little-endian u32 (see prequel/alice/difficulty.py labels_to_header)
)
MAX_UNSIZED_LEVELS = 1 << 24  # labels_from_header without a chunk count reads at most this many levels


def pace(progress: float, pacing: str, start: float) -> float:
    """How far the curriculum has opened, in [start, 1], after `progress` (0 → 1) of the warm-up."""
    p = min(max(progress, 0.0), 1.0)
    grown = {"linear": p, "root": math.sqrt(p), "step": math.floor(p * STEP_STAGES) / STEP_STAGES}[pacing]
    return start + (1.0 - start) * grown


def shuffle(n_tokens: int, seq_len: int, batch_size: int, seed: int) -> ChunkBatches:
    """A permutation of the chunks drawn from the seed. Free: the seed is part of f."""
    chunks = -(-n_tokens // seq_len)
    order = torch.randperm(chunks, generator=torch.Generator().manual_seed(seed))
    return ChunkBatches(n_tokens, seq_len, batch_size, order)


def length_warmup(
    n_tokens: int, seq_len: int, batch_size: int, pacing: str, start: float, warmup_tokens: int
) -> list[torch.Tensor]:
    """Short contexts first: batch k holds `batch_size` consecutive chunks of one length that
    grows from ``start * seq_len`` to `seq_len` as the first `warmup_tokens` tokens go by, then
    stays there. Tokens are read in natural order. Free: a function of config and data length.

    Shorter chunks also mean more optimizer steps per token early on, where the prequential
    loss is highest."""
    batches, pos = [], 0
    while pos < n_tokens:
        length = max(1, min(seq_len, round(seq_len * pace(pos / warmup_tokens, pacing, start))))
        starts = torch.arange(pos, min(pos + batch_size * length, n_tokens), length)
        batches.append(torch.stack([starts, torch.clamp(n_tokens - starts, max=length)], dim=1))
        pos = int(starts[-1]) + length
    return batches


def difficulty(
    n_tokens: int,
    seq_len: int,
    batch_size: int,
    seed: int,
    labels: torch.Tensor,
    pacing: str,
    start: float,
    warmup_tokens: int,
) -> list[torch.Tensor]:
    """Easy → hard by transmitted difficulty levels, with pacing as in CurriculumDataset: each
    batch is drawn (seeded) from the not-yet-seen chunks among the easiest ``pace(progress)``
    fraction of all chunks, so the pool opens from ``start`` to everything over `warmup_tokens`.

    Costs `order_bits(labels)` (prequel/alice/difficulty.py) = log2 of the number of ways to assign the
    levels (chunks per level are fixed by the count of chunks and levels): log2(N! / prod n_k!)
    <= N log2 K bits, log2 N! for a full ranking. Order within a level and the pacing draws come from the seed."""
    spans = chunk_spans(n_tokens, seq_len)
    if len(labels) != len(spans):
        raise ValueError(f"difficulty order has {len(labels)} levels for {len(spans)} chunks")
    generator = torch.Generator().manual_seed(seed)
    tie_break = torch.rand(len(spans), generator=generator, dtype=torch.float64)
    ranked = np.lexsort((tie_break.numpy(), labels.numpy())).tolist()  # easy → hard
    draws = torch.rand(len(spans), generator=generator, dtype=torch.float64).tolist()
    pool: list[int] = []  # unseen chunks inside the open part of the ranking
    batches, opened, taken, seen_tokens = [], 0, 0, 0
    while taken < len(spans):
        frontier = math.ceil(pace(seen_tokens / warmup_tokens, pacing, start) * len(spans))
        frontier = min(len(spans), max(frontier, taken + batch_size))
        pool.extend(ranked[opened:frontier])
        opened = max(opened, frontier)
        batch = []
        for _ in range(min(batch_size, len(pool))):
            i = int(draws[taken] * len(pool))
            pool[i], pool[-1] = pool[-1], pool[i]  # O(1) removal; the seed fixes the result
            batch.append(pool.pop())
            taken += 1
        batches.append(spans[batch])
        seen_tokens += int(spans[batch, 1].sum())
    return batches


def labels_from_header(text: str | None, n_chunks: int | None = None, levels: int | None = None) -> torch.Tensor | None:
    """The levels `labels_to_header` (prequel/alice/difficulty.py) wrote, checked against what the
    header's own sizes allow: exactly `n_chunks` (= ceil(data_tokens / block_size)) levels, each
    below `levels`. Decompression stops after the bytes those levels take, so a small forged order
    cannot expand into gigabytes (zlib reaches ~1000:1). Without `n_chunks`, at most
    `MAX_UNSIZED_LEVELS` levels are read."""
    if text is None:
        return None
    limit = LEVEL_BYTES * (MAX_UNSIZED_LEVELS if n_chunks is None else n_chunks)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(base64.b64decode(text), limit + 1)  # one byte more tells "too long"
    except (zlib.error, ValueError) as e:  # (binascii.Error is a ValueError)
        raise ValueError(f"transmitted order is not valid: {e}") from None
    if len(raw) > limit:
        what = (
            f"{n_chunks:,} chunks (data_tokens / block_size)"
            if n_chunks is not None
            else f"at most {MAX_UNSIZED_LEVELS:,} chunks"
        )
        raise ValueError(
            f"transmitted order is not valid: it decompresses to more than the {limit:,} bytes "
            f"of {LEVEL_BYTES}-byte levels for {what}; not expanding it further"
        )
    if not inflater.eof or inflater.unused_data:
        raise ValueError("transmitted order is not valid: its zlib data is truncated or has bytes after its end")
    if len(raw) % LEVEL_BYTES or (n_chunks is not None and len(raw) != limit):
        expected = (
            f"{limit:,} ({n_chunks:,} chunks × {LEVEL_BYTES})"
            if n_chunks is not None
            else f"a multiple of {LEVEL_BYTES}"
        )
        raise ValueError(f"transmitted order is not valid: {len(raw):,} bytes of levels, expected {expected}")
    labels = np.frombuffer(raw, dtype="<u4")
    if levels is not None and len(labels) and int(labels.max()) >= levels:
        raise ValueError(
            f"transmitted order is not valid: a chunk has level {int(labels.max())}, "
            f"but there are only {levels} levels (data.difficulty_levels, at most one per chunk)"
        )
    return torch.from_numpy(labels.astype(np.int64))
