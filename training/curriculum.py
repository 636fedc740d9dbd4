"""Orders in which the corpus is shown to the model, and what each costs in bits.

The corpus is cut into chunks of at most `seq_len` tokens; an order is a list of batches of
chunk spans ``(start, length)``. The decoder must rebuild the same list before it has decoded
any data, so an order may depend only on what is in f (config, seed) and the data length.
"""

import torch


def chunk_spans(n_tokens: int, seq_len: int) -> torch.Tensor:
    starts = torch.arange(0, n_tokens, seq_len)
    lengths = torch.clamp(n_tokens - starts, max=seq_len)
    return torch.stack([starts, lengths], dim=1)


def plan_batches(n_tokens: int, seq_len: int, batch_size: int, curriculum: str, seed: int) -> list[torch.Tensor]:
    """Every token appears in exactly one span of one batch (the first pass).

    - ``sequential``: natural order. Free: nothing to transmit.
    - ``shuffle``: a permutation drawn from the seed. Free: the seed is part of f.
    """
    spans = chunk_spans(n_tokens, seq_len)
    if curriculum == "shuffle":
        generator = torch.Generator().manual_seed(seed)
        spans = spans[torch.randperm(len(spans), generator=generator)]
    elif curriculum != "sequential":
        raise ValueError(f"data.curriculum: unknown order {curriculum!r}")
    return list(torch.split(spans, batch_size))
