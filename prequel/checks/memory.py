"""The memory a run, a replay or a compressor asks for, estimated from its settings alone, and the
messages that refuse it.

A config (or a stream header, which is one) names sizes: layers, width, context, batch, vocabulary,
n-gram tables, tokens, replay steps. Each is fine alone, but a forged or mistyped one (n_layer:
100000, block_size: 2**31) would make training allocate until the machine runs out, then fail
with a message about something else. So the memory is estimated before anything is allocated, and
what is over the limit ($PREQUEL_MAX_MEMORY_GB, inherited by child processes) is refused, naming
the setting that makes it so and how to raise the limit. Pure arithmetic: nothing here allocates.
"""

import dataclasses
import math
import os

from prequel.alice.difficulty import plan_size
from prequel.models.gpt import GPTConfig
from prequel.training.config import Config, ConfigError, mixture_members
from prequel.training.stream import StreamError


class MemoryLimitError(ConfigError):
    """Settings that are valid but would need more memory than the limit (`check_memory`); `key`
    is the setting the message names (or "data_tokens")."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


MEMORY_ENV = "PREQUEL_MAX_MEMORY_GB"  # the limit in GB (10**9 bytes), inherited by child processes
DEFAULT_MAX_MEMORY_GB = 16.0  # generous for every shipped config (configs/compress-gpu.yaml needs ~0.3 GB)
_GB = 10**9
_ACTIVATIONS_PER_LAYER = 20  # floats kept per token per layer for backward (qkv, attention, MLP 4x twice, norms)
_LOGITS_COPIES = 4  # logits, log-softmax, their gradient and a spare, per vocabulary entry and n-gram order
TAPE_BYTES_PER_TOKEN = 16  # a corpus held in memory (compress): an int64 token, its bytes, the tokenizer's work
LAZY_ORDERS = ("sequential", "strided", "shuffle")  # plans whose batches are built when asked for
_SPAN_BYTES = 160  # per chunk of a plan: its span, rank, tie-break and draw (curriculum.py)
_STEP_BYTES = 256  # per step of a plan: a (B, 2) span tensor's object (plus 16 bytes a row)


def max_memory_bytes() -> int:
    """The memory a run may ask for: $PREQUEL_MAX_MEMORY_GB, else DEFAULT_MAX_MEMORY_GB."""
    text = os.environ.get(MEMORY_ENV, "").strip()
    if not text:
        return int(DEFAULT_MAX_MEMORY_GB * _GB)
    try:
        gb = float(text)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and gb > 0):
        raise ConfigError(f"{MEMORY_ENV}: expected a number of gigabytes > 0, got {text!r}")
    return int(gb * _GB)


def format_bytes(n: int) -> str:
    """Bytes in decimal units, as the limit is given: 16 GB, 5.6 GB, 340.2 MB."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):  # noqa: B007 (unit: after)
        if n >= size:
            break
    return f"{n / size:,.1f}".removesuffix(".0") + f" {unit}"


def parameter_count(m: GPTConfig, vocab_size: int) -> int:
    """What `GPT(m).num_params()` will be, without building it (a tied embedding counted once)."""
    E, L, V, K = m.n_embd, m.n_layer, vocab_size, m.ngram_order
    return (
        (V + 1) * E
        + (m.block_size * E if m.positions == "learned" else 0)
        + L * 12 * E * E  # embeddings; blocks
        + (2 * L + 1) * E * (2 if m.bias else 1)
        + (9 * L * E if m.bias else 0)  # norms; linear biases
        + (0 if m.tie_embeddings else V * E)
        + K * (E + 1)
    )  # output head; n-gram mixer


def model_memory(
    m: GPTConfig, vocab_size: int, batch: int, training: bool = True, width: int = 4, kv_cache: bool = False
) -> list[tuple[str, int]]:
    """(what, bytes) of the memory a GPT of config `m` needs for batches of `batch` full-length
    sequences: weights (with gradients and AdamW's two moments when `training`), n-gram count
    tables, activations and logits, and the incremental coder's key/value cache. Estimates, within
    a small factor of what torch allocates; `width` is bytes per float (8 for 64-true)."""
    E, L, T, K, V = m.n_embd, m.n_layer, m.block_size, m.ngram_order, vocab_size
    params = parameter_count(m, vocab_size)
    parts = [
        (
            f"{params:,} parameters" + (" with their gradients and AdamW state" if training else ""),
            (4 if training else 1) * params * width,
        )
    ]
    if K:
        tables = (V + 1) * V + (K - 1) * (1 << m.ngram_hash_bits) * V
        parts.append((f"the n-gram count tables of orders 1..{K} ({tables:,} counts)", tables * width))
    per_token = L * _ACTIVATIONS_PER_LAYER * E if training else 8 * E
    logit_rows = min(batch * T, m.head_chunk or batch * T)  # head_chunk: that many rows of logits at a time
    logits = logit_rows * _LOGITS_COPIES * V * (1 + K)
    parts.append(
        (
            f"activations and logits of {batch:,} sequences of {T:,} tokens",
            batch * T * per_token * width + logits * width,
        )
    )
    if kv_cache:
        parts.append(("the incremental coder's key/value cache", 2 * L * batch * T * E * width))
    return parts


def run_memory(config: Config, data_tokens: int | None = None) -> list[tuple[str, int]]:
    """(what, bytes) of the memory training (or verify's replay of it) needs; with the token count,
    also the data and the batch plan."""
    m, d = config.model, config.data
    vocab_size = max(d.vocab_size, 256)  # (the tokenizer sets model.vocab_size; BPE at least 256)
    parts = [
        part
        for member in ([c for c, _ in mixture_members(config)] or [m])
        for part in model_memory(
            member,
            vocab_size,
            d.batch_size,
            training=True,
            width=8 if config.trainer.precision == "64-true" else 4,
            kv_cache=config.stream.enabled and config.stream.procedure == "incremental",
        )
    ]
    if data_tokens is not None:  # the tape is on disk (training/tokens.py); what grows with it is the plan
        chunks, steps = plan_size(
            data_tokens, config.chunk_len, d.batch_size, d.curriculum, d.pacing_start, d.replay_steps
        )
        if d.curriculum in LAZY_ORDERS and not d.replay_steps:  # batches built when asked for
            plan = 8 * chunks if d.curriculum == "shuffle" else 0  # (a shuffle keeps its permutation)
        else:
            plan = chunks * _SPAN_BYTES + steps * (_STEP_BYTES + 16 * d.batch_size)
        if d.context:  # `context_known`: a flag a token, and a row count a step
            plan += data_tokens + steps * (_STEP_BYTES + 8 * d.batch_size)
        parts.append((f"the plan of {steps:,} training steps over {chunks:,} chunks", plan))
    return parts


def max_corpus_bytes() -> int:
    """The largest corpus the memory limit allows read into memory (compress, a size sweep's
    baselines; training reads its corpus into token shards on disk instead)."""
    return max_memory_bytes() // TAPE_BYTES_PER_TOKEN


def corpus_limit_text() -> str:
    return (
        f"a corpus read into memory takes about {TAPE_BYTES_PER_TOKEN} bytes per byte, and the memory limit is "
        f"{format_bytes(max_memory_bytes())}: raise it with {MEMORY_ENV} if this machine has the memory"
    )


def coding_batch_bytes(config: GPTConfig, rows: int) -> int:
    """Memory for coding `rows` chunks at once: the KV cache and inputs (block_size positions),
    then per step the logits, softmax and float64 probabilities, activations and attention."""
    c, t = config.n_embd, config.block_size
    return rows * (8 * config.n_layer * t * c + 16 * t + 24 * config.vocab_size + 64 * c + 8 * config.n_head * t)


def over_limit_text(what: str, need: int, limit: int) -> str:
    return (
        f"{what} need about {format_bytes(need)}, more than the limit of {format_bytes(limit)}; if this machine "
        f"has the memory, raise the limit: {MEMORY_ENV}={-(-need // 10**9)}"
    )


def check_token_memory(tokens: int) -> None:
    """Refuse a compressed file whose token count would pass the limit: decompressing holds the
    tokens (int64) and the bytes they decode to."""
    need, limit = tokens * TAPE_BYTES_PER_TOKEN, max_memory_bytes()
    if need > limit:
        raise StreamError(
            "the file's header asks for more memory than allowed: "
            + over_limit_text(f"tokens = {tokens:,}", need, limit)
        )


# The settings `run_memory` grows with, each tried at its default to find the one to name.
_SIZING_KEYS = (
    "model.n_layer",
    "model.n_embd",
    "model.block_size",
    "model.ngram_order",
    "model.ngram_hash_bits",
    "data.batch_size",
    "data.vocab_size",
    "data.replay_steps",
    "data.pacing_start",
    "trainer.precision",
    "stream.procedure",
)


def _with_default(config: Config, key: str) -> Config:
    section, name = key.split(".")
    default = getattr(getattr(Config(), section), name)
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{name: default})})


def check_memory(config: Config, data_tokens: int | None = None, limit: int | None = None) -> None:
    """Refuse settings whose run would need more than `limit` bytes (default: `max_memory_bytes`),
    naming the setting that takes most of it (the one whose default value would save the most),
    the estimate, and how to raise the limit. Pure arithmetic: nothing is allocated."""
    limit = max_memory_bytes() if limit is None else limit
    parts = run_memory(config, data_tokens)
    total = sum(n for _, n in parts)
    if total <= limit:
        return
    saved = {
        key: total - sum(n for _, n in run_memory(_with_default(config, key), data_tokens)) for key in _SIZING_KEYS
    }
    if data_tokens is not None:  # the data's own share: what one chunk of it would need instead
        saved["data_tokens"] = total - sum(n for _, n in run_memory(config, min(data_tokens, config.model.block_size)))
    key = max(saved, key=saved.get)
    what, most = max(parts, key=lambda part: part[1])
    if key == "data_tokens":
        shown, advice = f"{data_tokens:,}", ""
    else:
        section, name = key.split(".")
        value, default = getattr(getattr(config, section), name), getattr(getattr(Config(), section), name)
        shown = str(value)
        advice = (
            f"{'lower' if value > default else 'raise'} it" if isinstance(value, (int, float)) else "change it"
        ) + f" (default {default}); "
    raise MemoryLimitError(
        f"{key} = {shown}: training would need about {format_bytes(total)} of memory "
        f"({format_bytes(most)} for {what}), "
        f"more than the limit of {format_bytes(limit)}; {advice}if this machine has the memory, raise the limit: "
        f"{MEMORY_ENV}={math.ceil(total / _GB)}",
        key,
    )
