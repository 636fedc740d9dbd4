"""Arithmetic coding of a batch with the model's predictions: one procedure for both sides.

`code_batch` walks a batch position-major (column t of every row, then t + 1), asks for the
logits of column t, turns them into probabilities and hands them to a coder: an encoder codes
the known targets, a `Decoder` decodes them, and `code_batch` writes what came back into
`targets` (the same symbols when encoding). The decoder's `logits_at` runs the model on what
it has decoded so far (models/kv_cache.py `incremental_logits`: by KV-cache steps, for both sides). Because
the decoder has positions < t when it needs column t, and causal attention makes column t
independent of later inputs, both sides see bitwise identical logits, so identical
probabilities, so the range coder inverts exactly.

The encoder is Alice's and not part of f (prequel/alice/encoder.py: `Encoder`, and `encode_known`, which
codes the same rows through the same `coding_probabilities` in one pass when the training forward
has given every logit); Bob needs only the `Decoder`.

Quantisation is constriction's leaky `Categorical(perfect=False)`: a deterministic function of
the float64 probability row that gives every symbol at least one quantum (so any symbol, even
one the model thinks impossible, stays codable), within a 24-bit fixed-point range coder.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

import constriction
import numpy as np
import torch

from prequel.training.data import IGNORE
from prequel.training.stream import StreamError

if TYPE_CHECKING:  # names for the annotations only: none of these is imported to decode
    from prequel.alice.encoder import Encoder
    from prequel.models.mixture import ColumnMixer

MODEL = constriction.stream.model.Categorical(perfect=False)  # the quantisation both sides code with


def coding_probabilities(logits: torch.Tensor) -> np.ndarray:
    """(R, V) logits → (R, V) float64 probabilities: row by row, the same bits for the same row
    of logits whatever the other rows (a float32 softmax over the last dim, then widened)."""
    return torch.softmax(logits.detach().float().contiguous(), dim=-1).cpu().double().numpy()


class Decoder:
    def __init__(self, words: np.ndarray):
        self._coder = constriction.stream.queue.RangeDecoder(np.ascontiguousarray(words, dtype=np.uint32))

    def code(self, symbols: torch.Tensor | None, probs: np.ndarray) -> torch.Tensor:
        """Decode one symbol per row of `probs` (R, V) and return them; `symbols` (what the
        encoder had in their place, unknown here) is ignored."""
        try:
            decoded = self._coder.decode(MODEL, probs)
        except (AssertionError, ValueError, RuntimeError, IndexError) as e:  # constriction's word check
            raise StreamError(
                f"the range coder met words that do not decode ({e}): the payload is corrupted, or "
                "this machine's arithmetic differs from the encoder's"
            ) from None
        return torch.from_numpy(decoded.astype(np.int64))

    def flush(self) -> None:
        """Nothing is queued: each symbol is decoded when asked for (the next column needs it)."""

    def exhausted(self) -> bool:
        """True once every word of the stream has been consumed."""
        return bool(self._coder.maybe_exhausted())


def code_batch(
    logits_at: Callable[[int], torch.Tensor],
    targets: torch.Tensor,
    coder: "Encoder | Decoder",
    code_rows: Callable | None = None,
    mixer: "ColumnMixer | None" = None,
) -> None:
    """Code `targets` (B, L) column by column (positions != IGNORE): encode them, or decode
    into them (the decoder's are placeholders until then).

    `logits_at(t)` gives column t's (B, V) logits once columns < t are in `targets`. `code_rows`
    (logits (R, V), symbols (R,), coder) → symbols codes a column's rows another way than with their
    probabilities (prequel/compress/codec.py: top-k + escape). With a `mixer` (a mixture of models),
    `logits_at(t)` gives the members' log-probabilities (B, K, V), and the rows of a column are
    coded one by one, each with the weights after the rows above it (models/mixture.py)."""
    present = targets != IGNORE
    for t in range(targets.shape[1]):
        rows = present[:, t]
        if not rows.any():
            continue
        if mixer is not None:
            member_lp = logits_at(t)
            for r in rows.nonzero()[:, 0].tolist():
                mixed = mixer.mix(member_lp[r : r + 1], mixer.before_rows()[r : r + 1])
                targets[r, t] = coder.code(targets[r : r + 1, t], coding_probabilities(mixed))[0]
                mixer.observe(r, member_lp[r, :, targets[r, t]])
            mixer.end_column()
            continue
        if code_rows is not None:
            symbols = code_rows(logits_at(t)[rows], targets[rows, t], coder)
        else:
            symbols = coder.code(targets[rows, t], coding_probabilities(logits_at(t))[rows.numpy()])
        targets[rows, t] = symbols
    coder.flush()
