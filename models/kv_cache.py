"""Incremental inference: keys and values kept per position, one new position per step.

For `stream.procedure: incremental` (both sides step through each batch) and the frozen compressor
(prequel/compress/codec.py). Its result is close to, but not bitwise equal to, the full forward's, so a
coder that needs exact bits runs these same steps on both sides, never mixing them with the full
forward. Part of f only for a run that steps incrementally (prequel/program.py).
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from prequel.models.gpt import GPT, GPTConfig
    from prequel.models.mixture import Mixture


class KVCache:
    """Keys and values of the positions run so far, for `forward_step`. Steps have other matmul and
    attention shapes than the full forward, so they round differently (see the module docstring);
    the same steps on both sides have the same shapes and inputs, so give the same bits."""

    def __init__(self, config: "GPTConfig", batch: int, device=None, dtype: torch.dtype = torch.float32):
        head_dim = config.n_embd // config.n_head
        # (layer, key|value, B, H, block_size, D): preallocated, so steps never reallocate
        self.kv = torch.zeros(
            config.n_layer, 2, batch, config.n_head, config.block_size, head_dim, device=device, dtype=dtype
        )
        self.pos = 0  # the position the next step fills
        self.idx = torch.zeros(batch, config.block_size, dtype=torch.long, device=device)  # inputs so far

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's key and value (B, H, 1, D) at position `pos`; return that layer's
        keys and values of positions 0..pos, for attention."""
        t, kv = self.pos, self.kv[layer]
        kv[:, :, :, t : t + 1] = torch.stack((k, v))
        return kv[0, :, :, : t + 1], kv[1, :, :, : t + 1]


def forward_step(model: "GPT", idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Incremental inference: idx (B,) are the ids at position cache.pos; returns the logits
    (B, vocab_size) of the next token, as forward would up to rounding (see KVCache)."""
    t = cache.pos
    if t >= model.config.block_size:
        raise ValueError(f"KV cache is full: position {t} exceeds block_size {model.config.block_size}")
    x, rope = model._embed(idx[:, None], t)
    for block in model.blocks:
        x = block(x, rope, cache)
    cache.idx[:, t] = idx
    cache.pos += 1
    prior = None
    if model.ngram is not None:  # the last position's contexts need only the last K inputs
        prior = model.ngram(cache.idx[:, max(0, t + 1 - model.config.ngram_order) : t + 1])[:, -1:]
    return model._head(x, prior)[:, 0]


def incremental_logits(model: "GPT | Mixture", targets: torch.Tensor, bos_id: int) -> Callable[[int], torch.Tensor]:
    """`logits_at` for `code_batch` by KV-cache steps: one `GPT.forward_step` per column, fed
    BOS, then column t - 1 of `targets` (known by then on both sides). Its bits are not the full
    forward's (see KVCache), so both sides must code with it. Columns `code_batch` skips (no
    tokens) are stepped through all the same, so the cache stays at the position asked for."""
    device = next(model.parameters()).device
    cache = model.new_cache(len(targets), device)
    bos = torch.full((len(targets),), bos_id)

    def logits_at(t: int) -> torch.Tensor:
        while True:
            x = targets[:, cache.pos - 1].clamp(min=0) if cache.pos else bos  # as Tape.inputs: IGNORE → 0
            logits = model.forward_step(x.to(device), cache)
            if cache.pos > t:
                return logits

    return logits_at
