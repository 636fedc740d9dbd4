"""Arithmetic coding of a batch with the model's predictions: one procedure for both sides.

`code_batch` walks a batch position-major (column t of every row, then t + 1), asks for the
logits of column t, turns them into probabilities and hands them to a coder: an `Encoder`
codes the known targets, a `Decoder` decodes them, and `code_batch` writes what came back into
`targets` (the same symbols when encoding). The decoder's `logits_at` runs the model on what
it has decoded so far; `incremental_logits` is that, by KV-cache steps, for both sides. Because
the decoder has positions < t when it needs column t, and causal attention makes column t
independent of later inputs, both sides see bitwise identical logits, so identical
probabilities, so the range coder inverts exactly. When the encoder knows all the logits
before coding (the training forward), `encode_known` codes the same rows in the same order in
one pass, so the same words.

Quantisation is constriction's leaky `Categorical(perfect=False)`: a deterministic function of
the float64 probability row that gives every symbol at least one quantum (so any symbol, even
one the model thinks impossible, stays codable), within a 24-bit fixed-point range coder.

Top-k + escape (`top_k > 0`, for large vocabularies): each symbol is coded as its rank among
the model's k most probable symbols, with those k probabilities taken from the full softmax
(float32) and the rest of the mass on an escape symbol k; on escape the symbol is then coded
with the model's distribution over the other V - k symbols. Nothing is lost (the escape path
is the exact conditional), and the V-entry quantisation runs only for escaped rows; but the
top-k selection is itself a pass over V, so on a CPU it saves little (docs/compress.md).
"""

from typing import TYPE_CHECKING, Callable

import constriction
import numpy as np
import torch

from models.gpt import GPT
from training.data import IGNORE
from training.stream import StreamError

if TYPE_CHECKING:  # (a mixture run imports it; others need it in neither f nor memory)
    from models.mixture import ColumnMixer, Mixture

_MODEL = constriction.stream.model.Categorical(perfect=False)
_ONE_PASS_FLOATS = 1 << 20  # probabilities an Encoder codes per constriction call, at most


def coding_probabilities(logits: torch.Tensor) -> np.ndarray:
    """(R, V) logits → (R, V) float64 probabilities: row by row, the same bits for the same row
    of logits whatever the other rows (a float32 softmax over the last dim, then widened)."""
    return torch.softmax(logits.detach().float().contiguous(), dim=-1).cpu().double().numpy()


class Encoder:
    """Queues symbols and codes them in one call per batch (`flush`): a queue coder gives the
    same bits as one call per column, without paying constriction's per-call cost 64 times."""

    def __init__(self):
        self._coder = constriction.stream.queue.RangeEncoder()
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []

    def code(self, symbols: torch.Tensor, probs: np.ndarray) -> torch.Tensor:
        """Encode `symbols` (R,), row r with the probabilities `probs[r]` (R, V); returns them."""
        self._pending.append((symbols.numpy().astype(np.int32), probs))
        return symbols

    def flush(self) -> None:
        runs: list[tuple[list, list]] = []  # consecutive rows of one width (top-k mixes widths)
        for symbols, probs in self._pending:
            if runs and runs[-1][1][-1].shape[1] == probs.shape[1]:
                runs[-1][0].append(symbols), runs[-1][1].append(probs)
            else:
                runs.append(([symbols], [probs]))
        for symbols, probs in runs:
            self._coder.encode(np.concatenate(symbols), _MODEL, np.concatenate(probs))
        self._pending = []

    def words(self) -> np.ndarray:
        """The stream so far as 32-bit words (sealed: decodable as is)."""
        self.flush()
        return self._coder.get_compressed()

    def num_bits(self) -> int:
        self.flush()
        return int(self._coder.num_bits())


class Decoder:
    def __init__(self, words: np.ndarray):
        self._coder = constriction.stream.queue.RangeDecoder(np.ascontiguousarray(words, dtype=np.uint32))

    def code(self, symbols: torch.Tensor | None, probs: np.ndarray) -> torch.Tensor:
        """Decode one symbol per row of `probs` (R, V) and return them; `symbols` (what the
        encoder had in their place, unknown here) is ignored."""
        try:
            decoded = self._coder.decode(_MODEL, probs)
        except (AssertionError, ValueError, RuntimeError, IndexError) as e:  # constriction's word check
            raise StreamError(f"the range coder met words that do not decode ({e}): the payload is corrupted, or "
                              "this machine's arithmetic differs from the encoder's") from None
        return torch.from_numpy(decoded.astype(np.int64))

    def flush(self) -> None:
        """Nothing is queued: each symbol is decoded when asked for (the next column needs it)."""

    def exhausted(self) -> bool:
        """True once every word of the stream has been consumed."""
        return bool(self._coder.maybe_exhausted())


def code_batch(logits_at: Callable[[int], torch.Tensor], targets: torch.Tensor, coder: Encoder | Decoder,
               top_k: int = 0, mixer: "ColumnMixer | None" = None) -> None:
    """Code `targets` (B, L) column by column (positions != IGNORE): encode them, or decode
    into them (the decoder's are placeholders until then).

    `logits_at(t)` gives column t's (B, V) logits once columns < t are in `targets`. `top_k` > 0
    codes with top-k + escape (see the module docstring). With a `mixer` (a mixture of models),
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
        if top_k:
            symbols = code_top_k(logits_at(t)[rows], targets[rows, t], coder, top_k)
        else:
            symbols = coder.code(targets[rows, t], coding_probabilities(logits_at(t))[rows.numpy()])
        targets[rows, t] = symbols
    coder.flush()


def encode_known(logits: torch.Tensor, targets: torch.Tensor, encoder: Encoder) -> None:
    """Encode `targets` (B, L) when all the logits (B, L, V) are known before coding (Alice with
    the training forward): the same rows through the same `coding_probabilities` (row-wise, so
    the batch shape cannot change its bits) in `code_batch`'s column-major order, hence the same
    words (tested), in a few passes instead of L, at a tenth of the cost."""
    present = targets != IGNORE
    b, length, vocab = logits.shape
    step = max(1, _ONE_PASS_FLOATS // (b * vocab))  # columns per pass: bounded memory at large V
    for t in range(0, length, step):
        columns = logits[:, t : t + step].detach().transpose(0, 1)  # column-major, as code_batch codes
        rows = present[:, t : t + step].T
        probs = coding_probabilities(columns.flatten(0, 1))[rows.flatten().numpy()]
        encoder.code(targets[:, t : t + step].T[rows], probs)
    encoder.flush()


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


def code_top_k(logits: torch.Tensor, symbols: torch.Tensor, coder: Encoder | Decoder, k: int) -> torch.Tensor:
    """Code one symbol per row of `logits` (R, V) as its top-k rank, or escape + the symbol
    among the other V - k; returns the symbols (decoded, or the given ones when encoding)."""
    logits = logits.detach().float().cpu()
    k = min(k, logits.shape[-1] - 1)
    p_top, index = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)  # sorted: same input, same ranks
    p_escape = (1 - p_top.sum(-1, keepdim=True)).clamp(min=0)  # leaky quantisation keeps it codable
    hit = index == symbols[:, None]
    rank = torch.where(hit.any(-1), hit.int().argmax(-1), k)  # the decoder's is a placeholder
    rank = coder.code(rank, torch.cat([p_top, p_escape], -1).double().numpy())
    out = index.gather(-1, rank.clamp(max=k - 1)[:, None])[:, 0]
    escaped = rank == k
    if escaped.any():  # the exact conditional: the softmax of the logits outside the top k
        rest = torch.softmax(logits[escaped].scatter(-1, index[escaped], -torch.inf), dim=-1)
        out[escaped] = coder.code(symbols[escaped], rest.double().numpy())
    return out
