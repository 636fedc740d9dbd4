"""Orders in which the corpus is shown to the model, and what each costs in bits.

The corpus is cut into chunks of at most `seq_len` tokens; an order is a list of batches of
chunk spans ``(start, length)`` that covers every token exactly once (the first pass). The
decoder must rebuild the same list before it has decoded any data, so an order may depend only
on what is in f (config, seed) and the data length, and is then free. An order that depends on
the content (`difficulty`) is *transmitted*: the encoder computes each chunk's difficulty level,
the stream header carries the levels, and their information content is added to |f| as the
``order`` part (prequel/alice/difficulty.py: computing and counting the levels is Alice's). Everything else
about the order (pacing, tie-breaking) is drawn from the seed.

The natural orders are here; `shuffle`, `length_warmup` and `difficulty` are in training/orders.py,
part of f only for a run that uses one (prequel/program.py).
"""

from collections.abc import Sequence

import torch

CURRICULA = ("sequential", "strided", "shuffle", "length_warmup", "difficulty")
PACINGS = ("linear", "step", "root")


def chunk_spans(n_tokens: int, seq_len: int) -> torch.Tensor:
    starts = torch.arange(0, n_tokens, seq_len)
    lengths = torch.clamp(n_tokens - starts, max=seq_len)
    return torch.stack([starts, lengths], dim=1)


class ChunkBatches(Sequence):
    """Batches of whole chunks, each built when it is asked for, so a plan over any corpus takes
    no memory (a permutation: 8 bytes a chunk). Batch i holds chunks ``order[i*B : (i+1)*B]``
    (`order` None: 0, 1, 2, ...), or with `stride` chunks i, i + S, i + 2S, ... for S batches."""

    def __init__(self, n_tokens: int, seq_len: int, batch_size: int, order=None, stride: bool = False):
        self.n_tokens, self.seq_len, self.batch_size, self.order = n_tokens, seq_len, batch_size, order
        self.chunks = -(-n_tokens // seq_len)
        self.stride = -(-self.chunks // batch_size) if stride else 0

    def __len__(self) -> int:
        return self.stride or -(-self.chunks // self.batch_size)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"batch {i} of {len(self)}")
        i %= len(self)
        if self.stride:
            chunks = torch.arange(i, self.chunks, self.stride)
        else:
            chunks = torch.arange(i * self.batch_size, min((i + 1) * self.batch_size, self.chunks))
            chunks = chunks if self.order is None else self.order[chunks]
        starts = chunks * self.seq_len
        return torch.stack([starts, torch.clamp(self.n_tokens - starts, max=self.seq_len)], dim=1)


def sequential(n_tokens: int, seq_len: int, batch_size: int) -> ChunkBatches:
    """Natural order. Free: nothing to transmit."""
    return ChunkBatches(n_tokens, seq_len, batch_size)


def strided(n_tokens: int, seq_len: int, batch_size: int) -> ChunkBatches:
    """Natural order in `batch_size` parts read side by side: batch i holds chunk i of each part,
    so each row continues the row above it a batch earlier, whose end is coded by then and can be
    read as context (data.context). Free: a function of the data length."""
    return ChunkBatches(n_tokens, seq_len, batch_size, stride=True)


class _FirstPass(Sequence):
    """`with_replay` without replay: each batch once, fresh; built when asked for."""

    def __init__(self, batches: Sequence):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.batches[i], True


def with_replay(
    batches: Sequence[torch.Tensor], replay_steps: int, window: int, seed: int
) -> Sequence[tuple[torch.Tensor, bool]]:
    """NNCP-style replay: after each fresh batch, `replay_steps` extra optimizer steps on
    batches drawn (seeded) from chunks already coded, the last `window` fresh batches' worth
    (0 = all of them). Free in bits: Bob has decoded those chunks by then, so he draws and
    trains on the same ones. Only fresh batches are coded and counted.

    Returns the step list as (spans, fresh) pairs."""
    if replay_steps == 0:
        return _FirstPass(batches)
    coded = torch.cat(list(batches))
    ends = torch.tensor([len(b) for b in batches]).cumsum(0).tolist()
    generator = torch.Generator().manual_seed(seed + 1)
    steps = []
    for k, batch in enumerate(batches):
        steps.append((batch, True))
        low = ends[k - window] if window and k >= window else 0
        for _ in range(replay_steps):
            pick = torch.randint(low, ends[k], (len(batch),), generator=generator)
            steps.append((coded[pick], False))
    return steps


def plan_batches(
    n_tokens: int,
    seq_len: int,
    batch_size: int,
    curriculum: str,
    seed: int,
    *,
    pacing: str = "linear",
    pacing_start: float = 0.125,
    warmup_tokens: int = 0,
    labels: torch.Tensor | None = None,
) -> Sequence[torch.Tensor]:
    """The first pass as a sequence of (B, 2) span batches; every token in exactly one span.

    `warmup_tokens` = 0 means the whole first pass. `labels` are the transmitted difficulty
    levels (only for `difficulty`)."""
    if curriculum == "sequential":
        return sequential(n_tokens, seq_len, batch_size)
    if curriculum == "strided":
        return strided(n_tokens, seq_len, batch_size)
    from prequel.training.orders import difficulty, length_warmup, shuffle  # (the others: in f only when configured)

    warmup = warmup_tokens if warmup_tokens > 0 else max(n_tokens, 1)
    if curriculum == "shuffle":
        return shuffle(n_tokens, seq_len, batch_size, seed)
    if curriculum == "length_warmup":
        return length_warmup(n_tokens, seq_len, batch_size, pacing, pacing_start, warmup)
    if curriculum == "difficulty":
        if labels is None:
            raise ValueError("the difficulty order needs its transmitted levels (labels)")
        return difficulty(n_tokens, seq_len, batch_size, seed, labels, pacing, pacing_start, warmup)
    raise ValueError(f"data.curriculum: unknown order {curriculum!r} (known: {', '.join(CURRICULA)})")
