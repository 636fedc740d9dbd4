"""The coding procedure of `prequel compress`, shared by compressor and decompressor.

A batch of chunks is coded position-major with `GPT.forward_step` and a KV cache, each chunk from a
fresh BOS context, with the full vocabulary or (``top_k``) as a top-k rank or an escape. The very
same steps run on both sides, so the logits agree bit for bit. `BudgetedDecoder` stops a forged
token count from decoding past what the payload can hold.
"""

import functools
import math

import numpy as np
import torch

from prequel.alice.encoder import Encoder
from prequel.checks.memory import MEMORY_ENV
from prequel.compress.frozen import CompressError
from prequel.models.gpt import GPT
from prequel.models.kv_cache import incremental_logits
from prequel.training.coding import Decoder, code_batch
from prequel.training.data import IGNORE
from prequel.training.stream import StreamError

PRECISION = 24  # constriction's range coder: probabilities in 24-bit fixed point, 32-bit words, a 64-bit state


def code_top_k(logits: torch.Tensor, symbols: torch.Tensor, coder: Encoder | Decoder, k: int) -> torch.Tensor:
    """Code one symbol per row of `logits` (R, V) as its top-k rank, or escape + the symbol
    among the other V - k; returns the symbols (decoded, or the given ones when encoding).

    For large vocabularies: the k probabilities are taken from the full softmax (float32) and the
    rest of the mass goes to an escape symbol k; on escape the symbol is then coded with the
    model's distribution over the other V - k symbols. Nothing is lost (the escape path is the
    exact conditional), and the V-entry quantisation runs only for escaped rows; but the top-k
    selection is itself a pass over V, so on a CPU it saves little (docs/compress.md)."""
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


def code_chunks(gpt: GPT, targets: torch.Tensor, coder: Encoder | Decoder, top_k: int = 0) -> None:
    """Encode the chunks (rows of `targets`, IGNORE after a chunk's end), or decode into them."""
    code_rows = functools.partial(code_top_k, k=top_k) if top_k else None
    code_batch(incremental_logits(gpt, targets, gpt.config.bos_id), targets, coder, code_rows)


def code_spans(
    gpt: GPT,
    n_tokens: int,
    coder: Encoder | Decoder,
    chunk_size: int,
    batch_chunks: int,
    top_k: int,
    tokens: torch.Tensor | None = None,
):
    """Code `n_tokens` tokens, `batch_chunks` chunks at a time, and yield each batch's tokens: the
    given `tokens` when encoding, what came back when decoding. A decoder holds one batch at a
    time, so a header that lies about the count costs at most one batch before the payload runs out."""
    per_batch = chunk_size * batch_chunks
    for number, first in enumerate(range(0, n_tokens, per_batch), 1):
        n = min(per_batch, n_tokens - first)
        rows = -(-n // chunk_size)
        where = f"batch {number} (tokens {first:,}..{first + n:,})"
        try:
            targets = torch.full((rows * chunk_size,), IGNORE, dtype=torch.long)
            targets[:n] = 0 if tokens is None else tokens[first : first + n]  # 0: the decoder's placeholders
            targets = targets.view(rows, chunk_size)
            code_chunks(gpt, targets, coder, top_k)
        except StreamError as e:
            raise StreamError(f"{where}: {e}") from None
        except (MemoryError, RuntimeError) as e:  # torch's allocator raises RuntimeError
            if isinstance(e, RuntimeError) and "alloc" not in str(e):
                raise
            raise CompressError(
                f"{where}: out of memory coding {rows:,} chunks of {chunk_size} tokens at once; this "
                f"machine has less memory than {MEMORY_ENV} allows (lower it, or use a bigger "
                "machine)"
            ) from None
        yield targets.flatten()[:n]


def min_symbol_bits(alphabet: int) -> float:
    """The least one symbol can cost: the leaky quantisation leaves each other symbol a quantum."""
    return -math.log2(1 - (alphabet - 1) / 2**PRECISION)


def payload_capacity_bits(words: int) -> int:
    """The most information a range coder can have coded into `words` words: its range starts
    at 2**64 and never falls below 2**32, and each emitted word gives back 32 bits."""
    return 32 * words + 32


class BudgetedDecoder(Decoder):
    """A Decoder that stops once the symbols it decoded carry more information than its words can.

    Past the last word the range coder reads zeros and decodes on as if there were more, so the
    coder alone never says that a header's token count is more than the payload holds. Each
    symbol cost the encoder at least -log2 of its quantised probability, which is at most
    p / sum(p) + 2 quanta of 2**-24 (constriction's fast leaky quantisation; 3 for float rounding)
    and at most 1 - (A - 1) quanta (each of the other A - 1 symbols keeps one); so for a real file
    this lower bound never exceeds `payload_capacity_bits` (tests/test_compress_hostile.py)."""

    def __init__(self, words):
        super().__init__(words)
        self.capacity_bits = payload_capacity_bits(len(words))
        self.bits = 0.0  # a lower bound of what the decoded symbols cost the encoder

    def code(self, symbols: torch.Tensor | None, probs: np.ndarray) -> torch.Tensor:
        try:
            decoded = super().code(symbols, probs)
        except StreamError:
            if self.exhausted():
                raise StreamError(self._ran_out()) from None
            raise
        p = probs[np.arange(len(decoded)), decoded.numpy()] / probs.sum(axis=1)
        cost = np.maximum(-np.log2(np.minimum(1.0, p + 3 * 2.0**-PRECISION)), min_symbol_bits(probs.shape[1]))
        self.bits += float(cost.sum())
        if self.bits > self.capacity_bits:
            raise StreamError(self._ran_out())
        return decoded

    def _ran_out(self) -> str:
        words = (self.capacity_bits - 32) // 32
        return (
            f"the payload ran out: its {words:,} words ({32 * words:,} bits) cannot hold the tokens decoded "
            f"so far (at least {self.bits:,.0f} bits under the model): the header claims more tokens than the "
            "file holds, or the payload is corrupted"
        )
