"""Compress any file with a frozen trained model: the "Language Modeling Is Compression" setting.

    python train.py compress   --ckpt RUN_OR_CKPT INPUT OUTPUT [--chunk_size N --top_k K]
    python train.py decompress --ckpt RUN_OR_CKPT INPUT OUTPUT

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
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import yaml

from callbacks.arithmetic_stream import parameters_sha256
from models.gpt import GPT, GPTConfig
from training.coding import Decoder, Encoder, code_batch, incremental_logits
from training.config import Config, ConfigError, config_from_dict
from training.data import IGNORE, DataError, read_corpus
from training.header import CompressHeader
from training.program import xz_bits
from training.report import classic_baselines
from training.environment import KernelError, ensure_kernels
from training.environment import check as check_environment
from training.environment import facts as environment_facts
from training.run import STREAM_NAME
from training.stream import Segment, Stream, StreamError, read_stream, write_atomic, write_stream
from training.tokenizer import build_tokenizer

FORMAT = 1  # bump when the coding procedure changes bits
DEFAULT_BATCH_CHUNKS = 256  # chunks coded at once: fewer Python steps, a bigger KV cache
# One step is many small ops; with more threads each op ends at an OpenMP barrier, and on a
# busy machine a descheduled thread stalls it for a time slice (measured 14x slower with 2).
DEFAULT_THREADS = 1


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
        return xz_bits(self.tokenizer.serialize()) // 8  # as |f| counts it; 0 for bytes


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
def code_chunks(gpt: GPT, targets: torch.Tensor, coder: Encoder | Decoder, top_k: int = 0) -> None:
    """Encode the chunks (rows of `targets`, IGNORE after a chunk's end), or decode into them."""
    code_batch(incremental_logits(gpt, targets, gpt.config.bos_id), targets, coder, top_k)


def code_tokens(gpt: GPT, tokens: torch.Tensor, coder: Encoder | Decoder, chunk_size: int, batch_chunks: int,
                top_k: int) -> tuple[torch.Tensor, int]:
    """All chunks, `batch_chunks` at a time; returns the tokens (decoded in place) and the batch count."""
    per_batch, batches = chunk_size * batch_chunks, 0
    for first in range(0, len(tokens), per_batch):
        span = tokens[first : first + per_batch]
        rows = -(-len(span) // chunk_size)
        targets = torch.full((rows * chunk_size,), IGNORE, dtype=torch.long)
        targets[: len(span)] = span
        targets = targets.view(rows, chunk_size)
        try:
            code_chunks(gpt, targets, coder, top_k)
        except StreamError as e:
            raise StreamError(f"batch {batches + 1} (tokens {first:,}..{first + len(span):,}): {e}") from None
        span.copy_(targets.flatten()[: len(span)])
        batches += 1
    return tokens, batches


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
             kernels: str = "native") -> dict:
    ensure_kernels(kernels)
    frozen = load_frozen(ckpt)
    batch_chunks = batch_chunks or DEFAULT_BATCH_CHUNKS
    block_size = frozen.gpt.config.block_size
    chunk_size = chunk_size or block_size
    if not 1 <= chunk_size <= block_size:
        raise CompressError(f"--chunk_size must be in 1..{block_size} (the model's block_size), got {chunk_size}")
    if batch_chunks < 1 or top_k < 0:
        raise CompressError("--batch_chunks must be >= 1 and --top_k >= 0")
    data = _read_input(input_path)
    torch.set_num_threads(threads or DEFAULT_THREADS)  # recorded in the header; decompress uses it
    started = time.perf_counter()
    tokens = frozen.tokenizer.encode(data)
    encoder = Encoder()
    _, batches = code_tokens(frozen.gpt, tokens.clone(), encoder, chunk_size, batch_chunks, top_k)
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
    size = write_stream(output_path, stream)
    report = rate_report(data, size, stream.payload_bits // 8, frozen)
    report.update(input=str(input_path), output=str(output_path), checkpoint=str(frozen.path), tokens=len(tokens),
                  chunks=-(-len(tokens) // chunk_size), chunk_size=chunk_size, top_k=top_k,
                  compress_seconds=seconds, compress_MBps=len(data) / 1e6 / max(seconds, 1e-9))
    return report


@_keeps_threads
def decompress(ckpt: Path, input_path: Path, output_path: Path, *, threads: int | None = None,
               allow_env_mismatch: bool = False) -> dict:
    try:
        stream = read_stream(input_path)
    except StreamError as e:
        raise CompressError(f"{input_path}: {e}") from None
    try:
        header = CompressHeader.from_dict(stream.header)
    except StreamError as e:
        raise CompressError(f"{input_path}: {e}") from None
    expected_sha = stream.trailer.get("data_sha256")
    if not isinstance(expected_sha, str):
        raise CompressError(f"{input_path}: trailer corrupted: data_sha256 missing")
    if header.format != FORMAT:
        raise CompressError(f"{input_path} has format {header.format}; this prequel reads format {FORMAT}")
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
    if len(stream.segments) != (1 if header.tokens else 0) or header.chunk_size > frozen.gpt.config.block_size:
        raise CompressError(f"{input_path}: corrupted (unexpected segment count or chunk size)")
    started = time.perf_counter()
    tokens = torch.full((header.tokens,), 0, dtype=torch.long)
    if header.tokens:
        decoder = Decoder(stream.segments[0].words)
        try:
            code_tokens(frozen.gpt, tokens, decoder, header.chunk_size, header.batch_chunks, header.top_k)
        except StreamError as e:  # the coder found words that do not decode
            raise CompressError(f"{input_path}: {e}") from None
        if not decoder.exhausted():
            raise CompressError(f"{input_path}: payload has words left over after {header.tokens:,} tokens: corrupted")
    data = frozen.tokenizer.decode(tokens)
    seconds = time.perf_counter() - started
    if len(data) != header.original_bytes or hashlib.sha256(data).hexdigest() != expected_sha:
        raise CompressError(f"{input_path}: decoded bytes do not match the original's sha256 (corrupted file, or "
                            "an environment whose arithmetic differs; no output written)")
    write_atomic(output_path, data)
    return {"input": str(input_path), "output": str(output_path), "checkpoint": str(frozen.path),
            "original_bytes": header.original_bytes, "sha256": expected_sha, "environment_differences": diffs,
            "decompress_seconds": seconds, "decompress_MBps": header.original_bytes / 1e6 / max(seconds, 1e-9)}


def _read_input(path: Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    return path.read_bytes()


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
    widths = [max(len(x[i]) for x in rows) for i in range(4)]
    lines = [f"{x[0]:<{widths[0]}}  " + "  ".join(f"{x[i]:>{widths[i]}}" for i in (1, 2, 3)) for x in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"{n:,} bytes, {r['tokens']:,} tokens in {r['chunks']:,} chunks of {r['chunk_size']} "
                 f"(top_k {r['top_k'] or 'off'}); compressed at {r['compress_MBps']:.3f} MB/s")
    return "\n".join(lines)
