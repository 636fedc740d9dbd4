"""A small GPT for prequential coding, readable top to bottom.

Two choices differ from nanoGPT because of what the model is *for*:

* The input alphabet has one extra symbol, BOS (id = ``vocab_size``), which starts every
  sequence; the output head predicts only the ``vocab_size`` real symbols. BOS is never
  coded, so no probability mass is wasted on it and every data token (the first one of
  each chunk too) has a prediction to be coded with.
* ``head: norm`` is Baichuan 2's NormHead: ``logits = h @ normalize(W, dim=1).T``. Each
  output row is scaled to unit L2 norm *functionally*, inside every forward, so the stored
  parameter never changes (tying and the decoder's bitwise replay of training stay exact).
  Normalising the weight rows is not the same as normalising the logits: it removes each
  token's freedom to grow its logit by growing its row norm (the frequency bias that
  makes rare-token rows unstable), while the hidden state's norm still sets the
  temperature of the whole distribution. Normalising logits would remove that too.
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum, rearrange

if TYPE_CHECKING:  # (models/kv_cache.py: imported only by a run that steps incrementally)
    from prequel.models.kv_cache import KVCache

HASH_BITS = 15  # default: n-gram contexts of 2+ tokens are hashed into 2**15 buckets per order


@dataclass
class GPTConfig:
    vocab_size: int = 256  # coded alphabet size m; the input alphabet adds BOS
    block_size: int = 128  # longest context, in tokens
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads per block (n_embd / n_head = head size)
    n_embd: int = 128  # width of the residual stream
    dropout: float = 0.0  # 0 keeps training replayable without RNG state (as NNCP)
    bias: bool = False  # biases in the linear layers and layer norms
    head: Literal["linear", "norm"] = "linear"  # norm = NormHead: logits = h @ normalize(W, dim=1).T
    tie_embeddings: bool = True  # the head reads the input embedding matrix (one tensor)
    positions: Literal["learned", "rope"] = "learned"  # learned position embeddings, or rotary
    z_loss: float = 0.0  # coefficient of the auxiliary loss z_loss * logsumexp(logits)^2
    ngram_order: int = 0  # > 0: mix adaptive context counts of orders 1..K into the logits (models/ngram.py)
    ngram_hash_bits: int = HASH_BITS  # orders >= 2 hash contexts into 2**bits rows of V counts each (memory!)
    # > 0: the head computes this many rows of logits at a time, in training (training/loss.py HeadNLL)
    # and coding alike, so no (batch, block, vocab) float32 logits exist; 0 = all at once. Changes bits
    head_chunk: int = 0

    @property
    def bos_id(self) -> int:
        return self.vocab_size


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.layer = layer  # which of a KVCache's layers is this one's
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: "KVCache | None" = None
    ) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:  # x is the one position cache.pos: store its key and value, attend to positions 0..pos
            y = F.scaled_dot_product_attention(q, *cache.update(self.layer, k, v))
        return self.resid_dropout(self.proj(rearrange(y, "b h t d -> b t (h d)")))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope, cache: "KVCache | None" = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


def rope_tables(head_dim: int, length: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    # In Python floats (libm), rounded once to float32: torch.pow of a tensor may be MKL's (models/portable_math).
    inv_freq = torch.tensor([base ** (-i / head_dim) for i in range(0, head_dim, 2)], dtype=torch.float32)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    t = x.shape[-2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[:t].to(x.dtype), sin[:t].to(x.dtype)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2)


def chunked_logits(h: torch.Tensor, w: torch.Tensor, rows: int) -> torch.Tensor:
    """(N, C) features times the (V, C) head matrix, `rows` rows at a time: the products the
    chunked loss (training/loss.py) computes, so both sides of a stream get the same bits."""
    if len(h) <= rows:
        return F.linear(h, w)
    return torch.cat([F.linear(part, w) for part in h.split(rows)])


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size + 1, config.n_embd)  # + BOS
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.positions == "learned" else None
        if config.positions == "rope":
            cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        # Tied: the head reads the first vocab_size rows of the embedding (BOS is never
        # predicted), so the two share one tensor and one set of gradients.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Context counts and, per position, how much to trust each order (computed from h).
        self.ngram = self.ngram_mix = None
        if config.ngram_order:
            from prequel.models.ngram import NGramPrior  # (only a run that uses it needs it in f: prequel/program.py)

            self.ngram = NGramPrior(config.vocab_size, config.ngram_order, hash_bits=config.ngram_hash_bits)
            self.ngram_mix = nn.Linear(config.n_embd, config.ngram_order)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if self.ngram_mix is not None:  # start by trusting longer contexts more, as PPM does
            with torch.no_grad():
                self.ngram_mix.bias.copy_(torch.arange(1.0, config.ngram_order + 1) / config.ngram_order * 0.6)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output matrix as stored: a view of the embedding when tied."""
        return self.wte.weight[: self.config.vocab_size] if self.lm_head is None else self.lm_head.weight

    def num_params(self) -> int:
        # parameters() yields a shared tensor once, so a tied embedding is counted once.
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, leave_out: torch.Tensor | None = None, first: int = 0) -> torch.Tensor:
        """idx: (B, T) ids in [0, vocab_size]; returns logits (B, T - first, vocab_size) of positions
        first.. . `leave_out`: the targets, when the n-gram prior has counted them already (see
        NGramPrior.forward)."""
        if self.config.head_chunk:  # (never with the n-gram prior: prequel/checks/settings.py)
            h = self.features(idx, first)
            return chunked_logits(h.flatten(0, 1), self.output_weight, self.config.head_chunk).unflatten(0, h.shape[:2])
        logits = self._head(self._trunk(idx), self.ngram(idx, leave_out) if self.ngram is not None else None)
        return logits[:, first:] if first else logits

    def features(self, idx: torch.Tensor, first: int = 0) -> torch.Tensor:
        """What the head reads at positions first.. : (B, T - first, n_embd)."""
        return self.ln_f(self._trunk(idx)[:, first:])

    def _trunk(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        x, rope = self._embed(idx, 0)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope)
        return x

    def _embed(self, idx: torch.Tensor, start: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Embeddings of the ids `idx` (B, T) at positions start..start + T - 1, and those
        positions' rotary tables (None unless rope): one code path for forward and forward_step."""
        x = self.wte(idx)
        end = start + idx.shape[1]
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, end, device=idx.device))
        if self.config.positions != "rope":
            return x, None
        return x, (self.rope_cos[start:end], self.rope_sin[start:end])

    @property
    def output_weight(self) -> torch.Tensor:
        """The matrix the head multiplies by: normalised rows for NormHead."""
        w = self.head_weight
        return F.normalize(w, dim=1) if self.config.head == "norm" else w  # (a new tensor: the parameter is untouched)

    def _head(self, x: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        x = self.ln_f(x)
        logits = F.linear(x, self.output_weight)
        if prior is not None:  # product of experts: GPT logits + weighted context log-probs
            logits = logits + einsum(self.ngram_mix(x), prior, "b t k, b t k v -> b t v")
        return logits

    @torch.no_grad()
    def new_cache(self, batch: int, device=None) -> "KVCache":
        from prequel.models.kv_cache import (
            KVCache,
        )  # (in f only for a run that steps incrementally: prequel/program.py)

        return KVCache(self.config, batch, device=device)

    def forward_step(self, idx: torch.Tensor, cache: "KVCache") -> torch.Tensor:
        """Incremental inference: idx (B,) are the ids at position cache.pos; returns the logits
        (B, vocab_size) of the next token, as forward would up to rounding (models/kv_cache.py)."""
        from prequel.models.kv_cache import forward_step

        return forward_step(self, idx, cache)
