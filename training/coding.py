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

_MODEL = constriction.stream.model.Categorical(perfect=False)


def coding_probabilities(logits: torch.Tensor) -> np.ndarray:
    """(B, V) logits → (B, V) float64 probabilities, the same bits for the same logits."""
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
        return torch.from_numpy(self._coder.decode(_MODEL, probs).astype(np.int64))

    def exhausted(self) -> bool:
        """True once every word of the stream has been consumed."""
        return bool(self._coder.maybe_exhausted())


def code_batch(logits_at: Callable[[int], torch.Tensor], targets: torch.Tensor, coder: Encoder | Decoder,
               top_k: int = 0) -> None:
    """Encode `targets` (B, L), or decode into it (positions != IGNORE), column by column.
    `top_k` > 0 codes with top-k + escape (see the module docstring)."""
    present = targets != IGNORE
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
