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
import os
import stat
import time
from pathlib import Path

import torch

from prequel.alice.encoder import Encoder
from prequel.checks.machine import check as check_environment
from prequel.checks.machine import facts as environment_facts
from prequel.checks.memory import (
    MEMORY_ENV,
    TAPE_BYTES_PER_TOKEN,
    coding_batch_bytes,
    format_bytes,
    max_memory_bytes,
    over_limit_text,
)
from prequel.checks.settings import MAX_THREADS, ConfigError, regular_file_size
from prequel.checks.stream_header import CompressHeader
from prequel.compress.chunks import BudgetedDecoder, code_spans
from prequel.compress.frozen import CompressError, FrozenModel, load_frozen, run_dir_of
from prequel.compress.rates import rate_report
from prequel.files import write_atomic
from prequel.training.data import DataError
from prequel.training.environment import KernelError, ensure_kernels
from prequel.training.stream import Segment, Stream, StreamError, encode_stream, read_stream
from prequel.verify.verifier import STREAM_NAME

FORMAT = 2  # bump when the coding procedure changes bits (2: rANS on integer intervals)
DEFAULT_BATCH_CHUNKS = 256  # chunks coded at once: fewer Python steps, a bigger KV cache
# One step is many small ops; with more threads each op ends at an OpenMP barrier, and on a
# busy machine a descheduled thread stalls it for a time slice (measured 14x slower with 2).
DEFAULT_THREADS = 1
_STREAM_READ_COPIES = 4  # decompress holds its input file about this many times over (bytes, parse, words)


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
def compress(
    ckpt: Path,
    input_path: Path,
    output_path: Path,
    *,
    chunk_size: int | None = None,
    batch_chunks: int | None = None,
    top_k: int = 0,
    threads: int | None = None,
    kernels: str = "native",
    overwrite: bool = True,
) -> dict:
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
    need, limit = coding_batch_bytes(frozen.gpt.config, rows) + len(data) * TAPE_BYTES_PER_TOKEN, max_memory_bytes()
    if need > limit:
        raise ConfigError(
            over_limit_text(
                f"--batch-chunks {batch_chunks:,} (chunks coded at once) and the {len(data):,}-byte input", need, limit
            )
            + ", or lower --batch-chunks"
        )
    torch.set_num_threads(threads or DEFAULT_THREADS)  # recorded in the header; decompress uses it
    started = time.perf_counter()
    tokens = frozen.tokenizer.encode(data)
    encoder = Encoder()
    batches = sum(1 for _ in code_spans(frozen.gpt, len(tokens), encoder, chunk_size, batch_chunks, top_k, tokens))
    words = encoder.words()
    seconds = time.perf_counter() - started
    header = CompressHeader(
        format=FORMAT,
        original_bytes=len(data),
        tokens=len(tokens),
        chunk_size=chunk_size,
        batch_chunks=batch_chunks,
        top_k=top_k,
        model_checkpoint=frozen.path.name,
        model_sha256=frozen.model_sha256,
        tokenizer_name=frozen.tokenizer.name,
        tokenizer_sha256=frozen.tokenizer_sha256,
        environment=environment_facts(kernels, "cpu"),
        dtype="float32",
    ).to_dict()
    segments = [Segment(batches, encoder.lanes, words)] if len(tokens) else []
    stream = Stream(header, segments, {"data_sha256": hashlib.sha256(data).hexdigest()})
    packed = encode_stream(stream)
    _write_output(output_path, packed, _files_read(ckpt, input_path), overwrite)
    report = rate_report(data, len(packed), stream.payload_bits // 8, frozen)
    report.update(
        input=str(input_path),
        output=str(output_path),
        checkpoint=str(frozen.path),
        tokens=len(tokens),
        chunks=-(-len(tokens) // chunk_size),
        chunk_size=chunk_size,
        top_k=top_k,
        compress_seconds=seconds,
        compress_MBps=len(data) / 1e6 / max(seconds, 1e-9),
    )
    return report


@_keeps_threads
def decompress(
    ckpt: Path,
    input_path: Path,
    output_path: Path,
    *,
    threads: int | None = None,
    allow_env_mismatch: bool = False,
    overwrite: bool = True,
) -> dict:
    """Checks every size in the file against the others, the payload and the memory limit before
    decoding, and decodes batch by batch, so a forged file costs at most one batch of work."""
    input_path, output_path = Path(input_path), Path(output_path)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    _check_threads(threads)
    _refuse_to_overwrite(output_path, _files_read(ckpt, input_path), overwrite)
    limit = max_memory_bytes() // _STREAM_READ_COPIES
    regular_file_size(
        input_path,
        "input",
        limit,
        f"decompress holds its input about {_STREAM_READ_COPIES} times "
        f"over, and the memory limit is {format_bytes(max_memory_bytes())}: raise it with {MEMORY_ENV} "
        "if this machine has the memory",
        error=DataError,
    )
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
            "pass the checkpoint it was compressed with"
        )
    if header.tokenizer_sha256 != frozen.tokenizer_sha256:
        raise CompressError(
            f"wrong tokenizer: {input_path} was coded with another {header.tokenizer_name} tokenizer "
            f"than the one rebuilt for {frozen.path}"
        )
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
        decoder = BudgetedDecoder(stream.segments[0].words, stream.segments[0].lanes)
        try:
            for tokens in code_spans(
                frozen.gpt, header.tokens, decoder, header.chunk_size, header.batch_chunks, header.top_k
            ):
                data += frozen.tokenizer.decode(tokens)
                if len(data) > header.original_bytes:
                    raise CompressError(
                        f"{input_path}: decoded more bytes than the header's original_bytes = "
                        f"{header.original_bytes:,}: corrupted (no output written)"
                    )
        except StreamError as e:  # the coder found words that do not decode, or too few of them
            raise CompressError(f"{input_path}: {e} (no output written)") from None
        if not decoder.exhausted():
            raise CompressError(f"{input_path}: payload has words left over after {header.tokens:,} tokens: corrupted")
    seconds = time.perf_counter() - started
    if len(data) != header.original_bytes or hashlib.sha256(data).hexdigest() != expected_sha:
        raise CompressError(
            f"{input_path}: decoded bytes do not match the original's sha256 (corrupted file, or "
            "an environment whose arithmetic differs; no output written)"
        )
    _write_output(output_path, data, _files_read(ckpt, input_path), overwrite)
    return {
        "input": str(input_path),
        "output": str(output_path),
        "checkpoint": str(frozen.path),
        "original_bytes": header.original_bytes,
        "sha256": expected_sha,
        "environment_differences": diffs,
        "decompress_seconds": seconds,
        "decompress_MBps": header.original_bytes / 1e6 / max(seconds, 1e-9),
    }


def _corrupted(input_path: Path, what: str) -> CompressError:
    return CompressError(f"{input_path}: header corrupted: {what}")


def _check_sizes(header: CompressHeader, stream: Stream, input_path: Path) -> None:
    """The header's sizes against each other, the payload and the memory limit (no model needed)."""
    tokens, original = header.tokens, header.original_bytes
    if tokens > original or (tokens == 0) != (original == 0):
        raise _corrupted(
            input_path,
            f"tokens = {tokens:,} for original_bytes = {original:,} (every token stands for at least one byte)",
        )
    need, limit = original * TAPE_BYTES_PER_TOKEN, max_memory_bytes()
    if need > limit:
        raise CompressError(
            f"{input_path}: the file's header asks for more memory than allowed: "
            + over_limit_text(f"original_bytes = {original:,}", need, limit)
        )
    if not tokens:
        if stream.segments:
            raise _corrupted(input_path, "tokens = 0 (an empty original), but the file carries a payload")
        return
    if len(stream.segments) != 1:
        raise CompressError(f"{input_path}: corrupted: expected one payload segment, found {len(stream.segments)}")
    per_batch = header.chunk_size * header.batch_chunks
    batches = -(-tokens // per_batch)
    if stream.segments[0].batches != batches:
        raise _corrupted(
            input_path,
            f"tokens = {tokens:,} in batches of {per_batch:,} make {batches:,} batches, "
            f"but the payload codes {stream.segments[0].batches:,}",
        )


def _check_sizes_for_model(header: CompressHeader, stream: Stream, frozen: FrozenModel, input_path: Path) -> None:
    """The sizes the model fixes: chunk size, bytes per token, tokens the payload can hold, batch memory."""
    config, tokens = frozen.gpt.config, header.tokens
    if header.chunk_size > config.block_size:
        raise _corrupted(
            input_path, f"chunk_size = {header.chunk_size:,}, more than the model's block_size {config.block_size}"
        )
    per_id = frozen.tokenizer.nbytes_per_id()
    longest = 1 if per_id is None else int(per_id.max())
    if header.original_bytes > tokens * longest:
        raise _corrupted(
            input_path,
            f"original_bytes = {header.original_bytes:,} from tokens = {tokens:,} (a "
            f"{frozen.tokenizer.name} token stands for at most {longest} byte(s))",
        )
    if not tokens:
        return
    rows = min(header.batch_chunks, -(-tokens // header.chunk_size))  # the first batch's: one lane each
    need = coding_batch_bytes(config, rows) + header.original_bytes * TAPE_BYTES_PER_TOKEN
    if need > max_memory_bytes():
        raise CompressError(
            f"{input_path}: the file's header asks for more memory than allowed: "
            + over_limit_text(
                f"batch_chunks = {header.batch_chunks:,} (chunks decoded at once)", need, max_memory_bytes()
            )
        )
    if stream.segments[0].lanes != rows:
        raise _corrupted(
            input_path,
            f"tokens = {tokens:,} in chunks of {header.chunk_size:,}, {header.batch_chunks:,} at a time, make "
            f"{rows:,} rows, but the payload codes {stream.segments[0].lanes:,} lanes",
        )


# --- files: what is read, what is written ---------------------------------------------------------
def _check_threads(threads: int | None) -> None:
    if threads is not None and threads > MAX_THREADS:
        raise ConfigError(f"--threads must be in 1..{MAX_THREADS}, got {threads}")


def _files_read(ckpt: Path, input_path: Path) -> list[tuple[str, Path]]:
    """What a command reads, which its output must never replace: the input, the checkpoint and
    the run files the model is rebuilt from."""
    ckpt = Path(ckpt)
    ckpt_file = ckpt / "checkpoints" / "last.ckpt" if ckpt.is_dir() else ckpt
    files = [("the input", Path(input_path)), ("the checkpoint", ckpt_file)]
    run_dir = run_dir_of(ckpt_file)
    if run_dir is not None:
        files += [("the run's config", run_dir / "config.yaml"), ("the run's stream", run_dir / STREAM_NAME)]
    return files


def _refuse_to_overwrite(output_path: Path, reads: list[tuple[str, Path]], overwrite: bool) -> None:
    try:
        info = os.stat(output_path)
    except NotADirectoryError:
        raise ConfigError(
            f"output {output_path}: a part of its path is a file, not a folder; give another output path"
        ) from None
    except OSError:  # absent (or unreachable: writing it will say why, naming it)
        return
    for what, path in reads:
        try:
            same = os.path.samefile(path, output_path)
        except OSError:
            continue
        if same:
            named = "" if Path(path) == Path(output_path) else f", {path}"
            raise ConfigError(
                f"output {output_path} is {what}{named}: refusing to write onto it, even with "
                "--force; give another output path"
            )
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
        raise OSError(
            e.errno,
            f"cannot write the output {output_path}: {e.strerror or e} (nothing was written; "
            "fix that or give another output path, and run the command again)",
        ) from None


def _read_input(path: Path) -> bytes:
    """A regular file's bytes, checked before reading: a device never ends, a FIFO blocks."""
    limit = max_memory_bytes() // TAPE_BYTES_PER_TOKEN
    regular_file_size(
        path,
        "input",
        limit,
        f"compress holds about {TAPE_BYTES_PER_TOKEN} bytes per byte of input, "
        f"and the memory limit is {format_bytes(max_memory_bytes())}: raise it with {MEMORY_ENV} if "
        "this machine has the memory",
        error=DataError,
    )
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
