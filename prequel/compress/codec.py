"""Compress any file with a frozen trained model: the "Language Modeling Is Compression" setting.

    prequel compress   --ckpt RUN_OR_CKPT INPUT OUTPUT [--chunk_size N --top_k K] [--force]
    prequel decompress --ckpt RUN_OR_CKPT INPUT OUTPUT [--force]

The input's tokens are cut into fixed-size chunks (default: the model's block_size), each coded
from a fresh context that starts at BOS, so chunks are independent (Delétang et al., 2024). A
batch of chunks is coded position-major (position t of every chunk, then t + 1) with
`GPT.forward_step` and a KV cache. Compressor and decompressor run the very same steps (same
batches, shapes, inputs and thread count), so their logits agree bit for bit; the full forward
is never used for coding, because its bits differ from the incremental ones (DESIGN.md).

The output is a training-stream file (training/stream.py) whose header has kind "compress" and
names the checkpoint by its parameters' sha256, the tokenizer by its sha256, the chunking and the
environment facts that change bits; the trailer holds the original's sha256.

The receiver must already hold the model, so compressed / original is the *raw* rate. The fair
two-part code sends the model too: *adjusted* rate = (compressed + |model|) / original, where
|model| is the parameters at their stored precision (a tied matrix once) plus the tokenizer.
"""

import functools
import hashlib
import json
import math
import os
import stat
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml

from prequel.callbacks.arithmetic_stream import parameters_sha256
from prequel.models.gpt import GPT, GPTConfig
from prequel.models.kv_cache import incremental_logits
from prequel.checks.settings import (
    MAX_THREADS,
    MEMORY_ENV,
    TAPE_BYTES_PER_TOKEN,
    Config,
    ConfigError,
    config_from_dict,
    format_bytes,
    max_memory_bytes,
    regular_file_size,
)
from prequel.alice.corpus import read_corpus
from prequel.alice.encoder import Encoder
from prequel.training.stream import encode_stream
from prequel.checks.machine import check as check_environment
from prequel.checks.machine import facts as environment_facts
from prequel.files import write_atomic
from prequel.checks.stream_header import CompressHeader
from prequel.program import packed_bits
from prequel.reports.summary import classic_baselines, text_table
from prequel.alice.tokenizing import build_tokenizer
from prequel.verify.verifier import STREAM_NAME
from prequel.training.coding import Decoder, code_batch
from prequel.training.data import IGNORE, DataError
from prequel.training.environment import KernelError, ensure_kernels
from prequel.training.stream import Segment, Stream, StreamError, read_stream

FORMAT = 1  # bump when the coding procedure changes bits
DEFAULT_BATCH_CHUNKS = 256  # chunks coded at once: fewer Python steps, a bigger KV cache
# One step is many small ops; with more threads each op ends at an OpenMP barrier, and on a
# busy machine a descheduled thread stalls it for a time slice (measured 14x slower with 2).
DEFAULT_THREADS = 1
_PRECISION = 24  # constriction's range coder: probabilities in 24-bit fixed point, 32-bit words, a 64-bit state
_STREAM_READ_COPIES = 4  # decompress holds its input file about this many times over (bytes, parse, words)


class CompressError(StreamError):
    """A checkpoint or compressed file that cannot be used as is; the message says why."""


@dataclass
class FrozenModel:
    gpt: GPT
    tokenizer: object  # ByteTokenizer | BPETokenizer
    path: Path  # the checkpoint file
    params_sha256: str
    param_bytes: int  # parameters at their stored precision, a shared (tied) tensor once

    @property
    def model_sha256(self) -> str:
        """What fixes the probabilities: the architecture and the parameters' bits."""
        config = json.dumps(asdict(self.gpt.config), sort_keys=True)
        return hashlib.sha256(f"{config}\n{self.params_sha256}".encode()).hexdigest()

    @property
    def tokenizer_sha256(self) -> str:
        return hashlib.sha256(self.tokenizer.name.encode() + b"\n" + self.tokenizer.serialize()).hexdigest()

    @property
    def tokenizer_bytes(self) -> int:
        return packed_bits(self.tokenizer.serialize()) // 8  # as |f| counts it; 0 for bytes


def checkpoint_path(path: Path) -> Path:
    path = Path(path)
    ckpt = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    if not ckpt.is_file():
        raise CompressError(f"no checkpoint at {ckpt} (give a run directory or a .ckpt file)")
    return ckpt


def load_frozen(path: Path) -> FrozenModel:
    """The model, in eval mode, and its tokenizer from a run directory or a checkpoint file."""
    ckpt_path = checkpoint_path(path)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike
        raise CompressError(f"{ckpt_path} is not a readable checkpoint: {e}") from None
    stored = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    state = {k.removeprefix("model."): v for k, v in stored.items() if isinstance(v, torch.Tensor)}
    run_config = _run_config(ckpt, ckpt_path)
    if run_config is not None and run_config.mixture.members:
        raise CompressError(f"{ckpt_path} holds a mixture of {run_config.mixture.members}: compress codes with one "
                            "model; train one size, or verify the mixture's own stream")
    gpt = GPT(_gpt_config(ckpt, run_config, ckpt_path))
    try:
        gpt.load_state_dict(state)
    except RuntimeError as e:
        raise CompressError(f"{ckpt_path}: weights do not fit the model its config describes: {e}") from None
    gpt.eval()
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}
    return FrozenModel(gpt, _tokenizer(ckpt_path, run_config, gpt.config.vocab_size), ckpt_path,
                       parameters_sha256(gpt), sum(unique.values()))


def _run_dir(ckpt_path: Path) -> Path | None:
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else None


def _run_config(ckpt: dict, ckpt_path: Path) -> Config | None:
    """The run's settings: stored in the checkpoint, else the run directory's config.yaml."""
    hparams = ckpt.get("hyper_parameters") or {}
    try:
        if isinstance(hparams.get("config"), dict):
            return config_from_dict(hparams["config"])
        run_dir = _run_dir(ckpt_path)
        if run_dir is not None and (run_dir / "config.yaml").is_file():
            return config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    except (ConfigError, yaml.YAMLError) as e:
        raise CompressError(f"{ckpt_path}: its run config is not valid: {e}") from None
    return None


def _gpt_config(ckpt: dict, run_config: Config | None, ckpt_path: Path) -> GPTConfig:
    hparams = ckpt.get("hyper_parameters") or {}
    try:
        if isinstance(hparams.get("model"), dict):
            return GPTConfig(**hparams["model"])
        if run_config is not None and "vocab_size" in hparams:
            return replace(run_config.model, vocab_size=int(hparams["vocab_size"]))
    except TypeError as e:
        raise CompressError(f"{ckpt_path}: model settings not understood: {e}") from None
    raise CompressError(f"{ckpt_path} does not say which model it holds (no hyper_parameters and no "
                        "config.yaml in its run directory): give a prequel checkpoint or run directory")


def _tokenizer(ckpt_path: Path, run_config: Config | None, vocab_size: int):
    """Bytes models need nothing; a BPE comes from the run's stream header, else is retrained
    (deterministically) from the run's corpus, exactly as training built it."""
    if vocab_size == 256:
        return build_tokenizer("bytes")
    run_dir = _run_dir(ckpt_path)
    try:
        if run_dir is not None and (run_dir / STREAM_NAME).is_file():
            info = read_stream(run_dir / STREAM_NAME).header["tokenizer"]
            tokenizer = build_tokenizer(info["name"], serialized=bytes.fromhex(info["blob"]))
        elif run_config is not None:
            d = run_config.data
            data = None if d.tokenizer_file else read_corpus(d.path)
            tokenizer = build_tokenizer(d.tokenizer, data=data, vocab_size=d.vocab_size, pretrained=d.tokenizer_file)
        else:
            raise CompressError(f"{ckpt_path}: a {vocab_size}-token model needs its BPE tokenizer; give its run directory")
    except (DataError, StreamError, KeyError, ValueError) as e:
        raise CompressError(f"{ckpt_path}: cannot rebuild the model's tokenizer: {e}") from None
    if tokenizer.vocab_size != vocab_size:
        raise CompressError(f"{ckpt_path}: the rebuilt tokenizer has {tokenizer.vocab_size} tokens, the model {vocab_size}")
    return tokenizer


# --- the coding procedure, shared by both sides ------------------------------------------------
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


def code_spans(gpt: GPT, n_tokens: int, coder: Encoder | Decoder, chunk_size: int, batch_chunks: int, top_k: int,
               tokens: torch.Tensor | None = None):
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
            raise CompressError(f"{where}: out of memory coding {rows:,} chunks of {chunk_size} tokens at once; this "
                                f"machine has less memory than {MEMORY_ENV} allows (lower it, or use a bigger "
                                "machine)") from None
        yield targets.flatten()[:n]


def _min_symbol_bits(alphabet: int) -> float:
    """The least one symbol can cost: the leaky quantisation leaves each other symbol a quantum."""
    return -math.log2(1 - (alphabet - 1) / 2**_PRECISION)


def _payload_capacity_bits(words: int) -> int:
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
    this lower bound never exceeds `_payload_capacity_bits` (tests/test_compress_hostile.py)."""

    def __init__(self, words):
        super().__init__(words)
        self.capacity_bits = _payload_capacity_bits(len(words))
        self.bits = 0.0  # a lower bound of what the decoded symbols cost the encoder

    def code(self, symbols: torch.Tensor | None, probs: np.ndarray) -> torch.Tensor:
        try:
            decoded = super().code(symbols, probs)
        except StreamError:
            if self.exhausted():
                raise StreamError(self._ran_out()) from None
            raise
        p = probs[np.arange(len(decoded)), decoded.numpy()] / probs.sum(axis=1)
        cost = np.maximum(-np.log2(np.minimum(1.0, p + 3 * 2.0**-_PRECISION)), _min_symbol_bits(probs.shape[1]))
        self.bits += float(cost.sum())
        if self.bits > self.capacity_bits:
            raise StreamError(self._ran_out())
        return decoded

    def _ran_out(self) -> str:
        words = (self.capacity_bits - 32) // 32
        return (f"the payload ran out: its {words:,} words ({32 * words:,} bits) cannot hold the tokens decoded "
                f"so far (at least {self.bits:,.0f} bits under the model): the header claims more tokens than the "
                "file holds, or the payload is corrupted")


def _batch_bytes(config: GPTConfig, rows: int) -> int:
    """Memory for coding `rows` chunks at once: the KV cache and inputs (block_size positions),
    then per step the logits, softmax and float64 probabilities, activations and attention."""
    c, t = config.n_embd, config.block_size
    return rows * (8 * config.n_layer * t * c + 16 * t + 24 * config.vocab_size + 64 * c + 8 * config.n_head * t)


def _memory_text(what: str, need: int, limit: int) -> str:
    return (f"{what} need about {format_bytes(need)}, more than the limit of {format_bytes(limit)}; if this machine "
            f"has the memory, raise the limit: {MEMORY_ENV}={-(-need // 10**9)}")


# --- the two commands ---------------------------------------------------------------------------
def _keeps_threads(command):
    """The commands set torch's thread count (part of what fixes the bits); callers get theirs back."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        before = torch.get_num_threads()
        try:
            return command(*args, **kwargs)
        finally:
            torch.set_num_threads(before)
    return run


@_keeps_threads
def compress(ckpt: Path, input_path: Path, output_path: Path, *, chunk_size: int | None = None,
             batch_chunks: int | None = None, top_k: int = 0, threads: int | None = None,
             kernels: str = "native", overwrite: bool = True) -> dict:
    """`overwrite=False` (the CLI without --force) refuses an existing output; the input and the
    files the model is read from are never written, whatever `overwrite` says."""
    input_path, output_path = Path(input_path), Path(output_path)
    ensure_kernels(kernels)
    batch_chunks = DEFAULT_BATCH_CHUNKS if batch_chunks is None else batch_chunks
    for flag, value, low in (("--batch-chunks", batch_chunks, 1), ("--top-k", top_k, 0), ("--threads", threads, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    _check_threads(threads)
    _refuse_to_overwrite(output_path, _files_read(ckpt, input_path), overwrite)
    data = _read_input(input_path)
    frozen = load_frozen(ckpt)
    block_size = frozen.gpt.config.block_size
    chunk_size = block_size if chunk_size is None else chunk_size
    if not 1 <= chunk_size <= block_size:
        raise ConfigError(f"--chunk-size must be in 1..{block_size} (the model's block_size), got {chunk_size}")
    rows = min(batch_chunks, -(-len(data) // chunk_size))  # tokens <= bytes: the first batch is at most this
    need, limit = _batch_bytes(frozen.gpt.config, rows) + len(data) * TAPE_BYTES_PER_TOKEN, max_memory_bytes()
    if need > limit:
        raise ConfigError(_memory_text(f"--batch-chunks {batch_chunks:,} (chunks coded at once) and the "
                                       f"{len(data):,}-byte input", need, limit) + ", or lower --batch-chunks")
    torch.set_num_threads(threads or DEFAULT_THREADS)  # recorded in the header; decompress uses it
    started = time.perf_counter()
    tokens = frozen.tokenizer.encode(data)
    encoder = Encoder()
    batches = sum(1 for _ in code_spans(frozen.gpt, len(tokens), encoder, chunk_size, batch_chunks, top_k, tokens))
    words = encoder.words()
    seconds = time.perf_counter() - started
    header = CompressHeader(
        format=FORMAT, original_bytes=len(data), tokens=len(tokens), chunk_size=chunk_size,
        batch_chunks=batch_chunks, top_k=top_k, model_checkpoint=frozen.path.name, model_sha256=frozen.model_sha256,
        tokenizer_name=frozen.tokenizer.name, tokenizer_sha256=frozen.tokenizer_sha256,
        environment=environment_facts(kernels, "cpu"), dtype="float32",
    ).to_dict()
    segments = [Segment(batches, words)] if len(tokens) else []
    stream = Stream(header, segments, {"data_sha256": hashlib.sha256(data).hexdigest()})
    packed = encode_stream(stream)
    _write_output(output_path, packed, _files_read(ckpt, input_path), overwrite)
    report = rate_report(data, len(packed), stream.payload_bits // 8, frozen)
    report.update(input=str(input_path), output=str(output_path), checkpoint=str(frozen.path), tokens=len(tokens),
                  chunks=-(-len(tokens) // chunk_size), chunk_size=chunk_size, top_k=top_k,
                  compress_seconds=seconds, compress_MBps=len(data) / 1e6 / max(seconds, 1e-9))
    return report


@_keeps_threads
def decompress(ckpt: Path, input_path: Path, output_path: Path, *, threads: int | None = None,
               allow_env_mismatch: bool = False, overwrite: bool = True) -> dict:
    """Checks every size in the file against the others, the payload and the memory limit before
    decoding, and decodes batch by batch, so a forged file costs at most one batch of work."""
    input_path, output_path = Path(input_path), Path(output_path)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    _check_threads(threads)
    _refuse_to_overwrite(output_path, _files_read(ckpt, input_path), overwrite)
    limit = max_memory_bytes() // _STREAM_READ_COPIES
    regular_file_size(input_path, "input", limit, f"decompress holds its input about {_STREAM_READ_COPIES} times "
                      f"over, and the memory limit is {format_bytes(max_memory_bytes())}: raise it with {MEMORY_ENV} "
                      "if this machine has the memory", error=DataError)
    try:
        stream = read_stream(input_path)
        header = CompressHeader.from_dict(stream.header)
    except StreamError as e:
        raise CompressError(f"{input_path}: {e}") from None
    expected_sha = stream.trailer.get("data_sha256")
    if not isinstance(expected_sha, str):
        raise CompressError(f"{input_path}: trailer corrupted: data_sha256 missing")
    if header.format != FORMAT:
        raise CompressError(f"{input_path} has format {header.format}; this prequel reads format {FORMAT}")
    _check_sizes(header, stream, input_path)
    frozen = load_frozen(ckpt)
    if header.model_sha256 != frozen.model_sha256:
        raise CompressError(
            f"wrong checkpoint: {input_path} was compressed with {header.model_checkpoint} (model sha256 "
            f"{header.model_sha256[:16]}…), but {frozen.path} holds model {frozen.model_sha256[:16]}…; "
            "pass the checkpoint it was compressed with")
    if header.tokenizer_sha256 != frozen.tokenizer_sha256:
        raise CompressError(f"wrong tokenizer: {input_path} was coded with another {header.tokenizer_name} tokenizer "
                            f"than the one rebuilt for {frozen.path}")
    kernels = header.environment.get("kernels", "native")
    try:
        ensure_kernels(kernels)  # (a CLI re-executes itself here with the pins the file was written with)
        torch.set_num_threads(threads or int(header.environment.get("num_threads") or torch.get_num_threads()))
        diffs = check_environment(header.environment, kernels, "cpu", allow_env_mismatch, error=CompressError)
    except KernelError as e:
        raise CompressError(f"{input_path}: {e}") from None
    _check_sizes_for_model(header, stream, frozen, input_path)
    started = time.perf_counter()
    data = bytearray()
    if header.tokens:
        decoder = BudgetedDecoder(stream.segments[0].words)
        try:
            for tokens in code_spans(frozen.gpt, header.tokens, decoder, header.chunk_size, header.batch_chunks,
                                     header.top_k):
                data += frozen.tokenizer.decode(tokens)
                if len(data) > header.original_bytes:
                    raise CompressError(f"{input_path}: decoded more bytes than the header's original_bytes = "
                                        f"{header.original_bytes:,}: corrupted (no output written)")
        except StreamError as e:  # the coder found words that do not decode, or too few of them
            raise CompressError(f"{input_path}: {e} (no output written)") from None
        if not decoder.exhausted():
            raise CompressError(f"{input_path}: payload has words left over after {header.tokens:,} tokens: corrupted")
    seconds = time.perf_counter() - started
    if len(data) != header.original_bytes or hashlib.sha256(data).hexdigest() != expected_sha:
        raise CompressError(f"{input_path}: decoded bytes do not match the original's sha256 (corrupted file, or "
                            "an environment whose arithmetic differs; no output written)")
    _write_output(output_path, data, _files_read(ckpt, input_path), overwrite)
    return {"input": str(input_path), "output": str(output_path), "checkpoint": str(frozen.path),
            "original_bytes": header.original_bytes, "sha256": expected_sha, "environment_differences": diffs,
            "decompress_seconds": seconds, "decompress_MBps": header.original_bytes / 1e6 / max(seconds, 1e-9)}


def _corrupted(input_path: Path, what: str) -> CompressError:
    return CompressError(f"{input_path}: header corrupted: {what}")


def _check_sizes(header: CompressHeader, stream: Stream, input_path: Path) -> None:
    """The header's sizes against each other, the payload and the memory limit (no model needed)."""
    tokens, original = header.tokens, header.original_bytes
    if tokens > original or (tokens == 0) != (original == 0):
        raise _corrupted(input_path, f"tokens = {tokens:,} for original_bytes = {original:,} (every token stands "
                                     "for at least one byte)")
    need, limit = original * TAPE_BYTES_PER_TOKEN, max_memory_bytes()
    if need > limit:
        raise CompressError(f"{input_path}: the file's header asks for more memory than allowed: "
                            + _memory_text(f"original_bytes = {original:,}", need, limit))
    if not tokens:
        if stream.segments:
            raise _corrupted(input_path, "tokens = 0 (an empty original), but the file carries a payload")
        return
    if len(stream.segments) != 1:
        raise CompressError(f"{input_path}: corrupted: expected one payload segment, found {len(stream.segments)}")
    per_batch = header.chunk_size * header.batch_chunks
    batches = -(-tokens // per_batch)
    if stream.segments[0].batches != batches:
        raise _corrupted(input_path, f"tokens = {tokens:,} in batches of {per_batch:,} make {batches:,} batches, "
                                     f"but the payload codes {stream.segments[0].batches:,}")


def _check_sizes_for_model(header: CompressHeader, stream: Stream, frozen: FrozenModel, input_path: Path) -> None:
    """The sizes the model fixes: chunk size, bytes per token, tokens the payload can hold, batch memory."""
    config, tokens = frozen.gpt.config, header.tokens
    if header.chunk_size > config.block_size:
        raise _corrupted(input_path, f"chunk_size = {header.chunk_size:,}, more than the model's block_size "
                                     f"{config.block_size}")
    per_id = frozen.tokenizer.nbytes_per_id()
    longest = 1 if per_id is None else int(per_id.max())
    if header.original_bytes > tokens * longest:
        raise _corrupted(input_path, f"original_bytes = {header.original_bytes:,} from tokens = {tokens:,} (a "
                                     f"{frozen.tokenizer.name} token stands for at most {longest} byte(s))")
    if not tokens:
        return
    words = len(stream.segments[0].words)
    alphabet = min(header.top_k, config.vocab_size - 1) + 1 if header.top_k else config.vocab_size
    most = int(_payload_capacity_bits(words) / _min_symbol_bits(alphabet))
    if tokens > most:
        raise _corrupted(input_path, f"tokens = {tokens:,}, but its payload of {words:,} words can hold at most "
                                     f"{most:,} (a token costs at least {_min_symbol_bits(alphabet):.2g} bits)")
    rows = min(header.batch_chunks, -(-tokens // header.chunk_size))
    need = _batch_bytes(config, rows) + header.original_bytes * TAPE_BYTES_PER_TOKEN
    if need > max_memory_bytes():
        raise CompressError(f"{input_path}: the file's header asks for more memory than allowed: " + _memory_text(
            f"batch_chunks = {header.batch_chunks:,} (chunks decoded at once)", need, max_memory_bytes()))


# --- files: what is read, what is written ------------------------------------------------------------
def _check_threads(threads: int | None) -> None:
    if threads is not None and threads > MAX_THREADS:
        raise ConfigError(f"--threads must be in 1..{MAX_THREADS}, got {threads}")


def _files_read(ckpt: Path, input_path: Path) -> list[tuple[str, Path]]:
    """What a command reads, which its output must never replace: the input, the checkpoint and
    the run files the model is rebuilt from."""
    ckpt = Path(ckpt)
    ckpt_file = ckpt / "checkpoints" / "last.ckpt" if ckpt.is_dir() else ckpt
    files = [("the input", Path(input_path)), ("the checkpoint", ckpt_file)]
    run_dir = _run_dir(ckpt_file)
    if run_dir is not None:
        files += [("the run's config", run_dir / "config.yaml"), ("the run's stream", run_dir / STREAM_NAME)]
    return files


def _refuse_to_overwrite(output_path: Path, reads: list[tuple[str, Path]], overwrite: bool) -> None:
    try:
        info = os.stat(output_path)
    except NotADirectoryError:
        raise ConfigError(f"output {output_path}: a part of its path is a file, not a folder; give another output "
                          "path") from None
    except OSError:  # absent (or unreachable: writing it will say why, naming it)
        return
    for what, path in reads:
        try:
            same = os.path.samefile(path, output_path)
        except OSError:
            continue
        if same:
            named = "" if Path(path) == Path(output_path) else f", {path}"
            raise ConfigError(f"output {output_path} is {what}{named}: refusing to write onto it, even with "
                              "--force; give another output path")
    if not stat.S_ISREG(info.st_mode):
        regular_file_size(output_path, "output", 0, "", error=ConfigError)  # names what it is
    if not overwrite:
        raise ConfigError(f"output {output_path} already exists; pass --force to replace it, or give another path")


def _write_output(output_path: Path, data: bytes | bytearray, reads: list[tuple[str, Path]], overwrite: bool) -> None:
    """Whole or absent (write_atomic); checked again, as it may have appeared while coding."""
    _refuse_to_overwrite(output_path, reads, overwrite)
    try:
        write_atomic(output_path, data)
    except OSError as e:
        raise OSError(e.errno, f"cannot write the output {output_path}: {e.strerror or e} (nothing was written; "
                               "fix that or give another output path, and run the command again)") from None


def _read_input(path: Path) -> bytes:
    """A regular file's bytes, checked before reading: a device never ends, a FIFO blocks."""
    limit = max_memory_bytes() // TAPE_BYTES_PER_TOKEN
    regular_file_size(path, "input", limit, f"compress holds about {TAPE_BYTES_PER_TOKEN} bytes per byte of input, "
                      f"and the memory limit is {format_bytes(max_memory_bytes())}: raise it with {MEMORY_ENV} if "
                      "this machine has the memory", error=DataError)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, even if it became a FIFO since
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise DataError(f"input: {path} is no longer a regular file; give a regular file")
            data = f.read(limit + 1)
    except OSError as e:
        raise DataError(f"input: cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise DataError(f"input: {path} grew to more than the {format_bytes(limit)} allowed while being read")
    return data


# --- the report ---------------------------------------------------------------------------------
def rate_report(data: bytes, compressed_bytes: int, payload_bytes: int, frozen: FrozenModel) -> dict:
    """Raw and adjusted rates next to the classic compressors, as fractions of the original."""
    n = max(len(data), 1)
    model_bytes = frozen.param_bytes + frozen.tokenizer_bytes
    report = {
        "original_bytes": len(data), "compressed_bytes": compressed_bytes, "payload_bytes": payload_bytes,
        "param_bytes": frozen.param_bytes, "tokenizer_bytes": frozen.tokenizer_bytes, "params": frozen.gpt.num_params(),
        "raw_rate": compressed_bytes / n, "adjusted_rate": (compressed_bytes + model_bytes) / n,
        "bits_per_byte": 8 * compressed_bytes / n, "payload_bits_per_byte": 8 * payload_bytes / n,
    }
    for key, bpb in classic_baselines(data).items():
        report[key.removeprefix("baseline/").replace("_bpb", "_rate")] = bpb / 8
    return report


def format_report(r: dict) -> str:
    n = r["original_bytes"]
    rows = [("what", "bytes", "rate", "bits/byte")]

    def row(label: str, nbytes: float) -> None:
        rows.append((label, f"{nbytes:,.0f}", f"{nbytes / max(n, 1):.4f}", f"{8 * nbytes / max(n, 1):.4f}"))

    row("compressed file (raw rate)", r["compressed_bytes"])
    row("  arithmetic-coded payload", r["payload_bytes"])
    row("  header + framing", r["compressed_bytes"] - r["payload_bytes"])
    row(f"model: {r['params']:,} parameters + tokenizer", r["param_bytes"] + r["tokenizer_bytes"])
    row("compressed + model (adjusted rate)", r["compressed_bytes"] + r["param_bytes"] + r["tokenizer_bytes"])
    for name, flag in (("gzip", "-9"), ("bzip2", "-9"), ("xz", "-9e")):
        row(f"{name} {flag} of the same bytes", r[f"{name}_rate"] * n)
    lines = text_table(rows)
    lines.append(f"{n:,} bytes, {r['tokens']:,} tokens in {r['chunks']:,} chunks of {r['chunk_size']} "
                 f"(top_k {r['top_k'] or 'off'}); compressed at {r['compress_MBps']:.3f} MB/s")
    return "\n".join(lines)
