"""Coding a batch with the model's predictions: one procedure for both sides.

`code_batch` walks a batch position-major (column t of every row, then t + 1), asks for the
logits of column t and hands their probabilities to a coder: an encoder codes the known targets,
a `Decoder` decodes them, and `code_batch` writes what came back into `targets` (the same symbols
when encoding). The decoder's `logits_at` runs the model on what it has decoded so far
(models/kv_cache.py `incremental_logits`: by KV-cache steps, for both sides). Because the decoder
has positions < t when it needs column t, and causal attention makes column t independent of
later inputs, both sides see bitwise identical logits, so identical probabilities, so identical
integer intervals.

Quantisation (`frequencies`) runs where the logits are, in integer arithmetic after one float
step: q = floor(p · (2^P − W)) for a row of W probabilities, every symbol gets q + 1 and the
row's remainder goes to its largest q, so each row sums to exactly 2^P and every symbol, even one
the model thinks impossible, stays codable. Integer sums are exact in any order, so both sides
agree whatever the device. The code loses at most −log2(1 − W / 2^P) bits a token to it (9e-5
at W = 131,072).

The entropy coder is interleaved rANS (Duda; laid out like Giesen's rans64, with 16-bit words so
that a state in [2^47, 2^63) keeps 2^16 of headroom over the total 2^31: with 32-bit words and
states from 2^31, rANS' rounding cost 2e-3 bits a token). One state per lane; lane r codes row r
of every batch. Alice encodes a segment backwards once it
is sealed (prequel/alice/encoder.py); Bob decodes a column of rows at once: the lanes' slots go
to the device, `lookup` finds each slot's symbol by searchsorted on the row's cumulative
frequencies, and only (symbol, start, frequency) come back. The host's work a token is a few
integer operations whatever the vocabulary (`_advance`). A segment's words begin with every
lane's final state; decoding ends with every state back at its start, which checks the segment.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

import numba
import numpy as np
import torch

from prequel.training.data import IGNORE
from prequel.training.stream import StreamError

if TYPE_CHECKING:  # names for the annotations only: none of these is imported to decode
    from prequel.alice.encoder import Encoder
    from prequel.models.mixture import ColumnMixer

P = 31  # a row's frequencies sum to 2**P
_CAP = 2147483520.0  # the largest float32 below 2**31: a product clamped to it converts to int32
LOW = 1 << 47  # a lane's state lives in [LOW, 2**63), int64 anywhere: 2**16 above 2**P, so rANS loses ~nothing
WORD = 16  # bits a word; a lane's state is 4 words
MASK = (1 << P) - 1
CHUNK = 1 << 22  # probabilities quantised at once, at most: O(CHUNK) memory whatever the batch


def frequencies(probs: torch.Tensor) -> torch.Tensor:
    """(R, W) probabilities → (R, W) int64 frequencies, each ≥ 1, every row summing to 2**P: the
    definition, in torch ops on any device (the CPU runs the same function fused: `_cpu_rows`)."""
    width = probs.shape[-1]
    if width < 2:
        raise ValueError("an alphabet of one symbol needs no code")
    budget = (1 << P) - width  # what is left once every symbol has its one
    q = (probs.float() * budget).clamp_(max=_CAP).int().clamp_(0, budget).long()  # floor; NaN: 0
    top = q.argmax(-1, keepdim=True)  # (the first of equal ones)
    total = q.sum(-1, keepdim=True)
    # Rows whose rounded p summed to more than 1 by more than the largest q can give back (never
    # seen) are scaled down, exactly; without a branch, so the host never waits for the device.
    over = total - budget > q.gather(-1, top)
    q = torch.where(over, q * budget // torch.where(over, total, 1), q)  # (a row of NaN sums to 0)
    total = torch.where(over, q.sum(-1, keepdim=True), total)
    q += 1
    return q.scatter_add_(-1, top, budget - total)  # the remainder (or the excess) to the largest


def _interval(freq: torch.Tensor, symbols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (start, frequency) of its symbol: int64 (R,) each."""
    cdf = freq.cumsum(-1)
    f = freq.gather(-1, symbols[:, None])[:, 0]
    return cdf.gather(-1, symbols[:, None])[:, 0] - f, f


def intervals(probs: torch.Tensor, symbols: torch.Tensor) -> torch.Tensor:
    """The encoder's side: (R, 2) int64 (start, frequency) of `symbols` (R,) under `probs` (R, W)."""
    if probs.device.type == "cpu":
        return _on_cpu(probs, symbols, 2)
    return torch.stack(_interval(frequencies(probs), symbols.to(probs.device)), -1)


def lookup(probs: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The decoder's side: the symbol whose interval holds each row's slot, (R, 3) int64
    (symbol, start, frequency), computed on `probs`' device (one transfer back)."""
    if probs.device.type == "cpu":
        return _on_cpu(probs, slots, 3)
    freq = frequencies(probs)
    symbols = torch.searchsorted(freq.cumsum(-1), slots.to(probs.device)[:, None], right=True)[:, 0]
    return torch.stack((symbols, *_interval(freq, symbols)), -1)


def _on_cpu(probs: torch.Tensor, given: torch.Tensor, columns: int) -> torch.Tensor:
    if probs.shape[-1] < 2:
        raise ValueError("an alphabet of one symbol needs no code")
    out = np.empty((len(probs), columns), dtype=np.int64)
    p = probs.detach().float().contiguous().numpy()
    _cpu_rows(p, np.ascontiguousarray(given.numpy(), dtype=np.int64), columns == 3, out)
    return torch.from_numpy(out)


_BLOCK = 256  # the fused CPU pass sums and maxes a row in blocks of this many symbols


@numba.njit(cache=True, nogil=True, inline="always")
def _q(p, scale, budget):  # pragma: no cover (compiled)
    """`frequencies`' q of one probability: the float32 product as torch's, NaN and below 0 to 0,
    then as in `frequencies` (int32 throughout, so the loops over it vectorise)."""
    v = p * scale
    v = v if v >= 0 else np.float32(0.0)
    v = v if v <= _CAP else np.float32(_CAP)
    return min(np.int32(v), budget)


@numba.njit(cache=True, nogil=True)
def _cpu_rows(probs, given, decode, out):  # pragma: no cover (compiled)
    """`frequencies` row by row without materialising it: one vectorised pass of block sums and
    maxima, then walks inside one block (the largest q's, and the symbol's or the slot's). The
    encoder's `given` are the symbols (out: start, frequency), the decoder's the slots (out: symbol,
    start, frequency); the same integers as `frequencies` (tests/test_coder.py compares them)."""
    width = probs.shape[1]
    budget = np.int32((1 << P) - width)
    scale = np.float32(budget)
    blocks = -(-width // _BLOCK)
    sums, maxima = np.empty(blocks, np.int64), np.empty(blocks, np.int32)
    for r in range(probs.shape[0]):
        row, y = probs[r], given[r]
        for b in range(blocks):
            total, largest = 0, np.int32(0)
            for j in range(b * _BLOCK, min((b + 1) * _BLOCK, width)):
                q = _q(row[j], scale, budget)
                total += q
                largest = max(largest, q)
            sums[b], maxima[b] = total, largest
        total, largest = sums.sum(), maxima.max()
        if total - budget > largest:  # (never seen: see frequencies)
            _exact_row(row, y, decode, out[r])
            continue
        b = 0
        while maxima[b] != largest:
            b += 1
        top = b * _BLOCK
        while _q(row[top], scale, budget) != largest:  # the first of the largest
            top += 1
        rest = budget - total  # goes to `top`
        if not decode:
            b = y // _BLOCK
            below = sums[:b].sum() + y + (rest if top < y else 0)
            for j in range(b * _BLOCK, y):
                below += _q(row[j], scale, budget)
            out[r, 0], out[r, 1] = below, _q(row[y], scale, budget) + 1 + (rest if top == y else 0)
            continue
        start, b = 0, 0
        while b < blocks - 1:  # the block that holds the slot
            mass = sums[b] + min(_BLOCK, width - b * _BLOCK) + (rest if b == top // _BLOCK else 0)
            if y < start + mass:
                break
            start, b = start + mass, b + 1
        for j in range(b * _BLOCK, min((b + 1) * _BLOCK, width)):
            f = _q(row[j], scale, budget) + 1 + (rest if j == top else 0)
            if y < start + f or j == width - 1:
                out[r, 0], out[r, 1], out[r, 2] = j, start, f
                break
            start += f


@numba.njit(cache=True, nogil=True)
def _exact_row(row, y, decode, out):  # pragma: no cover (compiled)
    """One row whose q must be scaled down, in integers (`frequencies`' rare branch)."""
    width = len(row)
    budget = (1 << P) - width
    scale = np.float32(budget)
    q = np.empty(width, np.int64)
    for j in range(width):
        q[j] = int(_q(row[j], scale, budget))
    top, raw = np.argmax(q), q.sum()
    q = q * budget // raw + 1
    q[top] += budget + width - q.sum()
    cdf = np.cumsum(q)
    if not decode:
        out[0], out[1] = cdf[y] - q[y], q[y]
        return
    s = min(np.searchsorted(cdf, y, side="right"), width - 1)
    out[0], out[1], out[2] = s, cdf[s] - q[s], q[s]


def target_intervals(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, W) probabilities and (N,) targets (IGNORE allowed) → (N, 2) intervals, chunk by chunk:
    the very rows `code_batch` codes one column at a time (a row's softmax ignores the others)."""
    out = torch.zeros(len(targets), 2, dtype=torch.long, device=probs.device)
    rows = max(1, CHUNK // probs.shape[-1])
    for at in range(0, len(targets), rows):
        out[at : at + rows] = intervals(probs[at : at + rows], targets[at : at + rows].clamp(min=0))
    return out


def logit_intervals(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`target_intervals` of the softmax of (N, V) logits."""
    return target_intervals(torch.softmax(logits.detach().float(), dim=-1), targets)


@numba.njit(cache=True, nogil=True)
def _advance(states, lanes, start, freq, words, pos):  # pragma: no cover (compiled)
    """Decode one symbol on each of `lanes` (its interval known): the rANS step and renormalisation.
    Returns the next word's position, or -1 if the words ran out."""
    for i in range(len(lanes)):
        x = states[lanes[i]]
        x = freq[i] * (x >> P) + (x & MASK) - start[i]
        while x < LOW:  # (twice at most: x >= 2**16 here)
            if pos == len(words):
                return -1
            x = (x << WORD) | np.int64(words[pos])
            pos += 1
        states[lanes[i]] = x
    return pos


@numba.njit(cache=True, nogil=True)
def _slots(states, lanes, out):  # pragma: no cover (compiled)
    """`Decoder.slots` (one call a column: cheaper than numpy's indexing at a few lanes); False if a
    lane is not in the segment."""
    for i in range(len(lanes)):
        if lanes[i] >= len(states):
            return False
        out[i] = states[lanes[i]] & MASK
    return True


class Decoder:
    """Bob's coder for one segment: its lanes' states, read from the head of its words."""

    def __init__(self, words: np.ndarray, lanes: int):
        words = np.ascontiguousarray(words, dtype=np.uint16)
        if lanes < 1 or len(words) < 4 * lanes:
            raise StreamError(f"segment of {len(words):,} words cannot hold the states of {lanes:,} lanes")
        head = words[: 4 * lanes].astype(np.int64).reshape(lanes, 4)
        self.states = (head[:, 0] << 48) | (head[:, 1] << 32) | (head[:, 2] << 16) | head[:, 3]
        if (head[:, 0] >= 1 << 15).any() or (self.states < LOW).any():
            raise StreamError("the payload is corrupted: a lane's state is out of range")
        self.words, self.pos = words, 4 * lanes

    def code(self, probs: torch.Tensor, symbols: torch.Tensor | None, lanes: np.ndarray) -> torch.Tensor:
        """Decode one symbol per row of `probs` (R, W), row r on lane `lanes[r]` (distinct lanes: a
        column); `symbols` (what the encoder had in their place, unknown here) is ignored."""
        found = lookup(probs, torch.from_numpy(self.slots(lanes))).cpu().numpy()  # the one round trip
        self.advance(lanes, found[:, 1], found[:, 2])
        return torch.from_numpy(found[:, 0])

    def slots(self, lanes: np.ndarray) -> np.ndarray:
        """Where each lane's state points into [0, 2**P): the decoded symbol's interval holds it."""
        out = np.empty(len(lanes), dtype=np.int64)
        if not _slots(self.states, lanes, out):
            raise StreamError(
                f"the batch has a row for lane {lanes.max()}, but the segment codes {len(self.states)} lanes: "
                "the payload does not match the header"
            )
        return out

    def advance(self, lanes: np.ndarray, start: np.ndarray, freq: np.ndarray) -> None:
        """Step each lane past the symbol it decoded, whose interval is (start, freq)."""
        pos = _advance(self.states, lanes, start, freq, self.words, self.pos)
        if pos < 0:
            raise StreamError(
                "the payload ran out: the header claims more tokens than the file holds, or it is corrupted"
            )
        self.pos, self.freq = pos, freq  # (the frequencies: what the symbols cost, for a budget)

    def exhausted(self) -> bool:
        """True once every word has been read and every lane is back at its first state."""
        return self.pos == len(self.words) and bool((self.states == LOW).all())


def code_batch(
    logits_at: Callable[[int], torch.Tensor],
    targets: torch.Tensor,
    coder: "Encoder | Decoder",
    code_rows: Callable | None = None,
    mixer: "ColumnMixer | None" = None,
) -> None:
    """Code `targets` (B, L) column by column (positions != IGNORE): encode them, or decode
    into them (the decoder's are placeholders until then). Row r codes on lane r.

    `logits_at(t)` gives column t's (B, V) logits once columns < t are in `targets`. `code_rows`
    (logits (R, V), symbols (R,), lanes (R,), coder) → symbols codes a column's rows another way than
    with their softmax (prequel/compress/chunks.py: top-k + escape). With a `mixer` (a mixture of
    models), `logits_at(t)` gives the members' log-probabilities (B, K, V), and the rows of a column
    are coded one by one, each with the weights after the rows above it (models/mixture.py)."""
    present = targets != IGNORE
    for t in range(targets.shape[1]):
        rows = present[:, t]
        if not rows.any():
            continue
        lanes = rows.nonzero()[:, 0].numpy()
        if mixer is not None:
            member_lp = logits_at(t)
            for r in lanes.tolist():
                mixed = mixer.mix(member_lp[r : r + 1], mixer.before_rows()[r : r + 1])
                probs = torch.softmax(mixed.float(), dim=-1)
                targets[r, t] = coder.code(probs, targets[r : r + 1, t], np.array([r]))[0]
                mixer.observe(r, member_lp[r, :, targets[r, t]])
            mixer.end_column()
            continue
        column = logits_at(t)
        logits = column[rows.to(column.device)]
        if code_rows is not None:
            symbols = code_rows(logits, targets[rows, t], lanes, coder)
        else:
            symbols = coder.code(torch.softmax(logits.float(), dim=-1), targets[rows, t], lanes)
        targets[rows, t] = symbols.to(targets.device)
