"""Bob's fast path for ``stream.procedure: full``: the full forward's column logits by single steps, bit for bit.

f decodes a batch of the ``full`` procedure with one full-shape forward per coded column (training/coding.py):
exact, because the training forward that Alice coded with has that shape, and ~L forwards a batch. A
KV-cache step computes only the new position, but rounds differently wherever a kernel's result depends
on its shape (models/kv_cache.py). `ExactSteps` keeps each kernel's shape where it decides the rounding:

* linear layers: MKL's sgemm rounds a row the same among 8 or 16 rows (by shape) as among the full
  forward's B·T rows, but not among 1-4 (another code path); a step pads its rows to the fewest that
  round alike (`linear_rows`). Portable mode's fixed-order GEMM computes each element alone: 1 row;
* attention: ATen's CPU flash kernel takes the queries in blocks of 32 (64 from 192 positions, 256 from
  768), each against every key slot; a query rounds the same in a block of 2 rows here, so a step runs
  that many query rows (the position in row 0, the causal mask as an additive mask) against the cached
  keys (`query_rows`), or, where no smaller block does, the flash block that holds the position.
  Portable mode's math attention rounds each query row alone: 1 row;
* layer norm, GELU, softmax, the n-gram prior and the embeddings are row by row already.

The fewest rows are measured on the decoding machine, on random data, once per shape: that choice is a
guess about kernels, not a proof.

Nothing here is trusted. After decoding a batch by steps, `FastStreamDecoder` runs f's full forward once
on what it decoded and compares the logits of every coded position bit for bit. Equal logits give equal
probabilities, so (column by column, by induction) every decoded symbol is the one Alice coded. If any
differ (another CPU, another library build), the rANS decoder is rewound to where the batch began and
the batch is decoded again by f's own procedure: a stream decodes to the same bits with or without this
module, only faster with it. That makes it a verifier's accelerator, not part of f (prequel/program.py).
"""

import contextlib
import copy
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import einsum

from prequel.callbacks.arithmetic_stream import StreamDecoder
from prequel.models.gpt import GPT, apply_rope
from prequel.training import run
from prequel.training.coding import Decoder, code_batch
from prequel.training.data import IGNORE
from prequel.training.run import Receiver
from prequel.training.stream import Stream, StreamError

ROWS = (1, 2, 4, 8, 16, 32, 64)  # row counts a step may pad to, fewest first


def flash_block(length: int) -> int:
    """Query block size of ATen's CPU flash attention for a sequence of `length` (its heuristic)."""
    return 256 if length >= 768 else 64 if length >= 192 else 32


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def causal_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """The additive mask (0 or -inf) of query rows at `positions` over `length` key slots, as SDPA makes
    of a boolean mask."""
    return torch.zeros(len(positions), length).masked_fill(
        torch.arange(length)[None, :] > positions[:, None], float("-inf")
    )


@functools.cache
def _block_mask(first: int, rows: int, last: int, length: int) -> torch.Tensor:
    """`causal_mask` of query rows for positions first.., the rows past `last` masked as `last`."""
    return causal_mask(torch.arange(first, first + rows).clamp(max=last), length)


@functools.cache
def linear_rows(rows: int, in_features: int, out_features: int, bias: bool, full_rows: int, threads: int) -> int:
    """The fewest rows (>= `rows`) with which one thread's F.linear rounds each row as it does among the
    full forward's `full_rows` rows at `threads`: measured here, on random data, once per shape."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(full_rows, in_features, generator=g)
    w, b = torch.randn(out_features, in_features, generator=g), torch.randn(out_features, generator=g) if bias else None
    with torch_threads(threads):
        full = F.linear(x, w, b)
    for m in [m for m in ROWS if rows <= m < full_rows] + [full_rows]:
        if all(torch.equal(F.linear(x[i : i + m], w, b), full[i : i + m]) for i in (0, full_rows - m)):
            return m
    return full_rows


@functools.cache
def query_rows(batch: int, heads: int, length: int, head_dim: int, threads: int) -> int | None:
    """The fewest query rows with which one thread's attention (the position in row 0, the causal mask as a
    mask) rounds every position as the causal flash kernel over `length` does at `threads`, measured
    here on random data; None: none does, so a step runs the flash block that holds its position."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=g) for _ in range(3))
    with torch_threads(threads):
        full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for r in [r for r in ROWS if r < flash_block(length)]:
        queries = q.new_zeros(batch, heads, r, head_dim)
        for t in range(length):
            queries[:, :, 0] = q[:, :, t]
            mask = causal_mask(torch.full((r,), t), length)
            if not torch.equal(F.scaled_dot_product_attention(queries, k, v, attn_mask=mask)[:, :, 0], full[:, :, t]):
                break
        else:
            return r
    return None


class ExactSteps:
    """One batch's positions, stepped in order, each with the bits of `model`'s full forward over `length`
    computed with `threads`; steps themselves run on one thread (call them inside `torch_threads(1)`)."""

    def __init__(self, model: GPT, batch: int, length: int, threads: int):
        c = model.config
        self.model, self.batch, self.length, self.threads = model, batch, length, threads
        self.heads, self.head_dim = c.n_head, c.n_embd // c.n_head
        self.keys = torch.zeros(c.n_layer, batch, c.n_head, length, self.head_dim)
        self.values = torch.zeros_like(self.keys)
        self.inputs = torch.zeros(batch, length, dtype=torch.long)
        self.pos = 0  # the next position to step
        w = model.head_weight
        self.head = F.normalize(w, dim=1) if c.head == "norm" else w  # as GPT._head, once a batch
        self.query_rows = query_rows(batch, c.n_head, length, self.head_dim, threads)
        self._padded: dict[int, torch.Tensor] = {}  # rows padded for a linear layer, by in_features
        self._queries: dict[int, torch.Tensor] = {}  # query rows, by the first position they hold
        self._blocks = [(b.ln_1, b.attn.qkv, b.attn.proj, b.ln_2, b.mlp.fc, b.mlp.proj) for b in model.blocks]

    @staticmethod
    def applies(model, device: torch.device, dtype: torch.dtype) -> bool:
        """Steps reproduce a float32 GPT on the CPU without dropout (not a mixture, not a GPU)."""
        return (
            isinstance(model, GPT) and device.type == "cpu" and dtype == torch.float32 and model.config.dropout == 0.0
        )

    @property
    def max_positions(self) -> int:
        """How many positions one step may take (the known context goes in steps of this many)."""
        return self.query_rows or flash_block(self.length)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, P, C) through a linear layer, its rows padded as `linear_rows` says."""
        rows = x.reshape(-1, x.shape[-1])
        n, (out_features, in_features) = len(rows), weight.shape
        m = linear_rows(n, in_features, out_features, bias is not None, self.batch * self.length, self.threads)
        if m > n:
            padded = self._padded.get(in_features)
            if padded is None or len(padded) < m:
                padded = self._padded[in_features] = rows.new_zeros(m, in_features)
            padded[:n] = rows
            rows = padded[:m]
        return F.linear(rows, weight, bias)[:n].view(*x.shape[:-1], out_features)

    def _query_block(self, start: int, p: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The query rows for positions start..start + P - 1, their causal mask, and the first one's row."""
        if self.query_rows is None:  # the flash block that holds the positions (P of them fit)
            size = flash_block(self.length)
            first = start // size * size
            block, at = min(first + size, self.length) - first, start - first
        else:
            first, block, at = start, self.query_rows, 0
        key = first if self.query_rows is None else -1
        if key not in self._queries:
            self._queries[key] = self.keys.new_zeros(self.batch, self.heads, block, self.head_dim)
        return self._queries[key], _block_mask(first, block, start + p - 1, self.length), at

    def _attention(self, layer: int, q: torch.Tensor, queries: torch.Tensor, mask: torch.Tensor, at: int):
        """q (B, H, P, D) in rows at.. of `queries` (the other rows: zeros or earlier positions', each row is
        computed on its own) against every key slot, masked causally."""
        queries[:, :, at : at + q.shape[2]] = q
        y = F.scaled_dot_product_attention(queries, self.keys[layer], self.values[layer], attn_mask=mask)
        return y[:, :, at : at + q.shape[2]]

    def step(self, ids: torch.Tensor, logits: bool = True) -> torch.Tensor | None:
        """Step the inputs `ids` (B, P) at the next P <= max_positions positions; return the logits
        (B, P, V) of the next tokens, as the full forward gives them."""
        model, start = self.model, self.pos
        b, p = ids.shape
        end = start + p
        self.inputs[:, start:end] = ids
        x, rope = model._embed(ids, start)
        queries, mask, at = self._query_block(start, p)
        c = x.shape[-1]
        for layer, (ln_1, qkv, proj, ln_2, fc, fc_proj) in enumerate(self._blocks):
            h = F.layer_norm(x, (c,), ln_1.weight, ln_1.bias)
            q, k, v = (
                self._linear(h, qkv.weight, qkv.bias).view(b, p, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            )
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            self.keys[layer, :, :, start:end], self.values[layer, :, :, start:end] = k, v
            y = self._attention(layer, q, queries, mask, at).transpose(1, 2).reshape(b, p, c)
            x = x + self._linear(y, proj.weight, proj.bias)
            h = F.gelu(self._linear(F.layer_norm(x, (c,), ln_2.weight, ln_2.bias), fc.weight, fc.bias))
            x = x + self._linear(h, fc_proj.weight, fc_proj.bias)
        self.pos = end
        if not logits:
            return None
        x = model.ln_f(x)
        out = self._linear(x, self.head)
        if model.ngram is not None:  # the contexts of these positions need only the K inputs before each
            window = self.inputs[:, max(0, start + 1 - model.config.ngram_order) : end]
            prior = model.ngram(window)[:, -p:]
            mix = self._linear(x, model.ngram_mix.weight, model.ngram_mix.bias)
            out = out + einsum(mix, prior, "b t k, b t k v -> b t v")
        return out


class FastStreamDecoder(StreamDecoder):
    """f's StreamDecoder, decoding a ``full`` batch by `ExactSteps` first, checked against f's forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fast_batches = self.slow_batches = 0

    def _code_before_step(self, trainer, pl_module, targets: torch.Tensor, batch: dict) -> None:
        param = next(pl_module.parameters())
        if (
            self.procedure != "full"
            or not ExactSteps.applies(pl_module.model, param.device, param.dtype)
            or trainer.precision_plugin.precision != "32-true"
        ):
            return super()._code_before_step(trainer, pl_module, targets, batch)
        start = _copy(self.coder)
        placeholders = targets.clone()
        before = self.tape.before(batch["spans"], batch.get("known"))
        try:
            with torch.no_grad():
                stepped = self._decode_by_steps(pl_module, targets, before)
                full = pl_module(self.tape.inputs(targets, before))  # f's forward, as Alice coded with it
            coded = targets != IGNORE
            if torch.equal(stepped[coded], full[coded]):
                self.fast_batches += 1
                return
        except StreamError:  # words Alice never wrote: proof of nothing but that the steps rounded differently
            pass
        self.slow_batches += 1  # not this machine's bits: decode the batch again, f's way
        self.coder = start
        targets.copy_(placeholders)
        super()._code_before_step(trainer, pl_module, targets, batch)

    def _decode_by_steps(self, pl_module, targets: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor:
        """Decode `targets` column by column with stepped logits; return those logits (B, L, V)."""
        context = pl_module.config.data.context
        bos = torch.full((len(targets), 1), self.tape.bos_id)
        first = bos if before is None else before  # the inputs before column 0: context + 1 of them
        steps = ExactSteps(
            pl_module.model, len(targets), first.shape[1] + targets.shape[1] - 1, torch.get_num_threads()
        )
        stepped = torch.zeros(*targets.shape, pl_module.model.config.vocab_size)

        def logits_at(t: int) -> torch.Tensor:
            while steps.pos <= context + t:
                column = steps.pos - context
                ids = first[:, -1:] if column == 0 else targets[:, column - 1 : column].clamp(min=0)
                stepped[:, column] = steps.step(ids)[:, 0]
            return stepped[:, t]

        with torch_threads(1):  # steps are too small to share: a second thread would only wait
            for at in range(0, context, steps.max_positions):  # the known context first
                steps.step(first[:, at : min(at + steps.max_positions, context)], logits=False)
            code_batch(logits_at, targets, self.coder)
        return stepped


def decode(bob: Receiver, stream: Stream, callbacks: list = (), tape_dir: Path | None = None):
    """f's `training.run.decode` with a FastStreamDecoder in its StreamDecoder's place."""
    return run.decode(bob, stream, callbacks, tape_dir, decoder_type=FastStreamDecoder)


def _copy(decoder: Decoder) -> Decoder:
    """A Decoder at `decoder`'s position, to rewind to (its words are shared, never written)."""
    twin = copy.copy(decoder)
    twin.states = decoder.states.copy()
    return twin
