"""Arithmetic coding of a batch with the model's predictions: one procedure for both sides.

`code_batch` walks a batch position-major (column t of every row, then t + 1), asks for the
logits of column t, turns them into probabilities and either encodes the known targets or
decodes them into `targets` in place. The encoder's `logits_at` reads the training forward it
already ran; the decoder's runs the model on what it has decoded so far. Because the decoder
has positions < t when it needs column t, and causal attention makes column t independent of
later inputs, both sides see bitwise identical logits, so identical probabilities, so the
range coder inverts exactly.

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

from typing import Callable

import constriction
import numpy as np
import torch

from training.data import IGNORE
from training.stream import StreamError

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

    def code(self, targets: torch.Tensor, probs: np.ndarray) -> None:
        self._pending.append((targets.numpy().astype(np.int32), probs))

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

    def code(self, targets: torch.Tensor, probs: np.ndarray) -> torch.Tensor:
        try:
            symbols = self._coder.decode(_MODEL, probs)
        except (AssertionError, ValueError, RuntimeError, IndexError) as e:  # constriction's word check
            raise StreamError(f"the range coder met words that do not decode ({e}): the payload is corrupted, or "
                              "this machine's arithmetic differs from the encoder's") from None
        return torch.from_numpy(symbols.astype(np.int64))

    def exhausted(self) -> bool:
        """True once every word of the stream has been consumed."""
        return bool(self._coder.maybe_exhausted())


def code_batch(logits: torch.Tensor | Callable[[int], torch.Tensor], targets: torch.Tensor,
               coder: Encoder | Decoder, top_k: int = 0) -> None:
    """Encode `targets` (B, L), or decode into it (positions != IGNORE), column by column.

    `logits` is the (B, L, V) tensor when all of it is known before coding (Alice with the
    training forward), else a function giving column t's (B, V) logits once columns < t are
    known. Given the tensor, the columns are coded in one pass: the same rows through the same
    `coding_probabilities` (row-wise, so the batch shape cannot change its bits) in the same
    column-major order, hence the same words as the column loop (tested), at a tenth of the
    cost. `top_k` > 0 codes with top-k + escape (see the module docstring)."""
    present = targets != IGNORE
    if isinstance(logits, torch.Tensor) and isinstance(coder, Encoder) and not top_k:
        b, length, vocab = logits.shape
        step = max(1, _ONE_PASS_FLOATS // (b * vocab))  # columns per pass: bounded memory at large V
        for t in range(0, length, step):
            columns = logits[:, t : t + step].detach().transpose(0, 1)  # column-major, as the loop codes
            rows = present[:, t : t + step].T
            coder.code(targets[:, t : t + step].T[rows], coding_probabilities(columns.flatten(0, 1))[rows.flatten().numpy()])
        coder.flush()
        return
    logits_at = (lambda t: logits[:, t]) if isinstance(logits, torch.Tensor) else logits
    for t in range(targets.shape[1]):
        rows = present[:, t]
        if not rows.any():
            continue
        if top_k:
            symbols = code_top_k(logits_at(t)[rows], targets[rows, t], coder, top_k)
        else:
            probs = coding_probabilities(logits_at(t))[rows.numpy()]
            symbols = coder.code(targets[rows, t], probs)
        if isinstance(coder, Decoder):
            targets[rows, t] = symbols
    if isinstance(coder, Encoder):
        coder.flush()


def code_top_k(logits: torch.Tensor, symbols: torch.Tensor, coder: Encoder | Decoder, k: int) -> torch.Tensor:
    """Code one symbol per row of `logits` (R, V) as its top-k rank, or escape + the symbol
    among the other V - k; returns the symbols (decoded, or the given ones when encoding)."""
    logits = logits.detach().float().cpu()
    k = min(k, logits.shape[-1] - 1)
    p_top, index = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)  # sorted: same input, same ranks
    p_escape = (1 - p_top.sum(-1, keepdim=True)).clamp(min=0)  # leaky quantisation keeps it codable
    hit = index == symbols[:, None]
    rank = _coded(coder, torch.where(hit.any(-1), hit.int().argmax(-1), k), torch.cat([p_top, p_escape], -1))
    out = index.gather(-1, rank.clamp(max=k - 1)[:, None])[:, 0]
    escaped = rank == k
    if escaped.any():  # the exact conditional: the softmax of the logits outside the top k
        rest = torch.softmax(logits[escaped].scatter(-1, index[escaped], -torch.inf), dim=-1)
        out[escaped] = _coded(coder, symbols[escaped], rest)
    return out


def _coded(coder: Encoder | Decoder, symbols: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Encode `symbols` and return them, or decode and return the decoded ones."""
    decoded = coder.code(symbols, probs.double().numpy())
    return symbols if decoded is None else decoded
