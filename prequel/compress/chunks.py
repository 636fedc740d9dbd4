"""The coding procedure of `prequel compress`, shared by compressor and decompressor.

A batch of chunks is coded position-major with `GPT.forward_step` and a KV cache, each chunk from a
fresh BOS context, with the full vocabulary or (``top_k``) as a top-k rank or an escape. The very
same steps run on both sides, so the logits agree bit for bit. `BudgetedDecoder` stops a forged
token count from decoding past what the payload can hold.
"""

import functools

import numpy as np
import torch

from prequel.alice.encoder import Encoder
from prequel.checks.memory import MEMORY_ENV
from prequel.compress.frozen import CompressError
from prequel.models.gpt import GPT
from prequel.models.kv_cache import incremental_logits
from prequel.training.coding import Decoder, P, code_batch
from prequel.training.data import IGNORE
from prequel.training.stream import StreamError


def code_top_k(
    logits: torch.Tensor, symbols: torch.Tensor, lanes: np.ndarray, coder: Encoder | Decoder, k: int
) -> torch.Tensor:
    """Code one symbol per row of `logits` (R, V) as its top-k rank, or escape + the symbol
    among the other V - k; returns the symbols (decoded, or the given ones when encoding).

    For large vocabularies: the k probabilities are taken from the full softmax (float32) and the
    rest of the mass goes to an escape symbol k; on escape the symbol is then coded with the
    model's distribution over the other V - k symbols. Nothing is lost (the escape path is the
    exact conditional), and only k + 1 frequencies are quantised for a row that does not escape;
    but the top-k selection is itself a pass over V, so on a CPU it saves little (docs/compress.md)."""
    logits = logits.detach().float()
    k = min(k, logits.shape[-1] - 1)
    p_top, index = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)  # sorted: same input, same ranks
    p_escape = (1 - p_top.sum(-1, keepdim=True)).clamp(min=0)  # every symbol keeps a frequency ≥ 1
    hit = index == symbols.to(index.device)[:, None]
    rank = torch.where(hit.any(-1), hit.int().argmax(-1), k)  # the decoder's is a placeholder
    rank = coder.code(torch.cat([p_top, p_escape], -1), rank, lanes).to(index.device)
    out = index.gather(-1, rank.clamp(max=k - 1)[:, None])[:, 0]
    escaped = rank == k
    if escaped.any():  # the exact conditional: the softmax of the logits outside the top k
        rest = torch.softmax(logits[escaped].scatter(-1, index[escaped], -torch.inf), dim=-1)
        out[escaped] = coder.code(rest, symbols[escaped.cpu()], lanes[escaped.cpu().numpy()]).to(out.device)
    return out.cpu()


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


def payload_capacity_bits(words: int) -> int:
    """The most information rANS can have coded into `words` words: every word holds 16 bits (the
    lanes' final states are words too, and each state starts at 2**47, so they hold less)."""
    return 16 * words


class BudgetedDecoder(Decoder):
    """A Decoder that stops once the symbols it decoded carry more information than its words can.

    A symbol of frequency f cost the encoder -log2(f / 2**P) bits (rANS' state grows by that factor,
    give or take the rounding of one division), and a symbol the model is sure of costs almost
    nothing, so a header's token count that is more than the payload holds could keep the coder
    decoding long before its words run out. The budget stops it once the decoded symbols' cost
    exceeds `payload_capacity_bits` plus a word per lane of slack for rANS' rounding
    (tests/test_compress_hostile.py: never for a real stream)."""

    def __init__(self, words, lanes: int):
        super().__init__(words, lanes)
        self.capacity_bits = payload_capacity_bits(len(words)) + 32 * lanes  # (slack for rANS' rounding)
        self.bits = 0.0  # what the decoded symbols cost the encoder (the ideal code of their frequencies)

    def code(self, probs: torch.Tensor, symbols: torch.Tensor | None, lanes: np.ndarray) -> torch.Tensor:
        try:
            decoded = super().code(probs, symbols, lanes)
        except StreamError:
            if self.pos == len(self.words):
                raise StreamError(self._ran_out()) from None
            raise
        self.bits += float((P - np.log2(self.freq)).sum())
        if self.bits > self.capacity_bits:
            raise StreamError(self._ran_out())
        return decoded

    def _ran_out(self) -> str:
        words = len(self.words)
        return (
            f"the payload ran out: its {words:,} words ({16 * words:,} bits) cannot hold the tokens decoded "
            f"so far (at least {self.bits:,.0f} bits under the model): the header claims more tokens than the "
            "file holds, or the payload is corrupted"
        )
