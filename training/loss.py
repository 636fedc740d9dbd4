"""A step's loss and the probabilities it codes with: one softmax for both.

`SoftmaxNLL` takes the whole batch's (N, V) float32 logits. `HeadNLL` takes the features before
the output head instead and computes the logits `rows` rows at a time, in the forward and again
in the backward. At a vocabulary of 50k and 10^5 tokens a step, the whole batch's logits would
be 20 GB of float32; a chunk of them is what HeadNLL ever holds (``model.head_chunk``).

What must be equal is equal: the decoder's logits of a chunked run come from the same
`models.gpt.chunked_logits` (the same products of the same rows), so the probabilities Alice
codes with are bitwise Bob's. The loss and gradients equal the unchunked ones up to the order of
float additions (one chunk: the same bits; tests/test_loss.py).

Neither waits for the device. A target whose probability underflows (< 1e-30) gets its NLL from
the logsumexp form, so it stays finite. On the CPU only those rows' logsumexp is computed (the host
knows at once which rows they are); on a GPU every row's is, because picking the rows would make
the host wait for the device at every step.
"""

import contextlib

import torch

from prequel.models import portable_math
from prequel.models.gpt import chunked_logits
from prequel.training.coding import target_intervals
from prequel.training.data import IGNORE


def softmax_nll(
    logits: torch.Tensor, targets: torch.Tensor, coded: torch.Tensor | None = None, sync_free: bool | None = None
):
    """(N, V) float32 logits, (N,) targets → per-token NLL (nats, 0 where IGNORE), the softmax, the
    targets as indices (IGNORE as 0) and which are coded (`coded`: targets != IGNORE, if the caller
    has it). `sync_free`: the GPU's way (default: off the CPU)."""
    probs = torch.softmax(logits, dim=-1)
    coded = targets != IGNORE if coded is None else coded
    safe = targets.clamp(min=0)
    nll = portable_math.log(probs.gather(-1, safe[:, None])[:, 0]).neg_()
    if logits.device.type != "cpu" if sync_free is None else sync_free:
        tiny = coded & ~(nll < 69.0)  # p < 1e-30 (or NaN)
        exact = torch.logsumexp(logits, dim=-1) - logits.gather(-1, safe[:, None])[:, 0]
        nll = torch.where(tiny, exact, nll)
    elif len(nll) and not nll.max().item() < 69.0:  # one read for the common case: no p < 1e-30, no NaN
        tiny = coded & ~(nll < 69.0)
        if tiny.any():
            lse = portable_math.logsumexp(logits[tiny], dim=-1)
            nll[tiny] = lse - logits[tiny].gather(-1, safe[tiny, None])[:, 0]
    return torch.where(coded, nll, 0.0), probs, safe, coded


def _logits_grad(probs: torch.Tensor, safe: torch.Tensor, grad_nll: torch.Tensor, coded: torch.Tensor):
    """d NLL / d logits = (p − onehot) · grad, in place of `probs`."""
    g = torch.where(coded, grad_nll, 0.0)[:, None]
    return probs.mul_(g).scatter_add_(-1, safe[:, None], -g)


class SoftmaxNLL(torch.autograd.Function):
    """(N, V) float32 logits, (N,) targets and (N,) targets != IGNORE → per-token NLL and the softmax
    itself: the probabilities the stream codes with, computed once a step (the backward, p − onehot,
    reuses them in place)."""

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, targets: torch.Tensor, coded: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        nll, probs, safe, coded = softmax_nll(logits, targets, coded)
        ctx.save_for_backward(probs, safe, coded)
        ctx.mark_non_differentiable(probs)
        return nll, probs

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor, _grad_probs) -> tuple[torch.Tensor, None, None]:
        probs, safe, coded = ctx.saved_tensors
        return _logits_grad(probs, safe, grad_nll, coded), None, None


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    return [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]


class HeadNLL(torch.autograd.Function):
    """(N, C) features `h`, the (V, C) head matrix `w`, (N,) targets → per-token NLL (N,) and, with
    `intervals`, each target's coding interval (N, 2) int64 ((0, 2) without): `rows` rows of
    logits at a time. The backward recomputes each chunk's logits, under the forward's autocast."""

    @staticmethod
    def forward(ctx, h, w, targets, rows: int, intervals: bool):
        nll = torch.empty(len(h), dtype=torch.float32, device=h.device)
        spans = torch.zeros(len(h) if intervals else 0, 2, dtype=torch.long, device=h.device)
        for at in range(0, len(h), rows):
            part = slice(at, at + rows)
            nll[part], probs, _, _ = softmax_nll(chunked_logits(h[part], w, rows).float(), targets[part])
            if intervals:
                spans[part] = target_intervals(probs, targets[part])
        ctx.save_for_backward(h, w, targets)
        ctx.rows, ctx.autocast = rows, _autocast_state()
        ctx.mark_non_differentiable(spans)
        return nll, spans

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor, _grad_spans):
        h, w, targets = ctx.saved_tensors
        grad_h, grad_w = torch.empty_like(h), torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        with contextlib.ExitStack() as autocast:
            for device, dtype in ctx.autocast:
                autocast.enter_context(torch.autocast(device, dtype))
            for at in range(0, len(h), ctx.rows):
                part = slice(at, at + ctx.rows)
                probs = torch.softmax(chunked_logits(h[part], w, ctx.rows).float(), dim=-1)
                g = _logits_grad(probs, targets[part].clamp(min=0), grad_nll[part], targets[part] != IGNORE)
                grad_h[part] = g @ w
                grad_w += (g.T @ h[part]).float()
        return grad_h, grad_w.to(w.dtype), None, None, None
