"""`prequel verify`: check a stream, decode it with f (training/run.py `decode`), check the result.

Decoding is f's (by default each `full` batch goes first through prequel/verify/fast_decode.py's single steps,
which are checked against f's forward and give way to f's procedure wherever they differ: the same
bits, faster); everything here decides whether to decode and reports: the header's fields and
sizes (prequel/checks/stream_header.py), the source hash, the machine (prequel/checks/machine.py), then after decoding
the data's sha256, the final weights against the encoder's checkpoint, and Σ beside the stream's
real size (the code-length callback). None of it changes a decoded bit, so none of it is in f.
"""

import hashlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prequel.alice.difficulty import order_bits
from prequel.callbacks.code_length import CodeLength
from prequel.checks import stream_header as headers
from prequel.checks.machine import check as check_environment
from prequel.checks.machine import require_device
from prequel.checks.settings import MAX_THREADS, ConfigError, counted_yaml
from prequel.files import TEMP_SUFFIX, write_atomic
from prequel.program import code_hash, f_parts
from prequel.training.environment import KernelError
from prequel.training.module import PrequelModule
from prequel.training.run import Receiver, decode, receiver
from prequel.training.stream import Stream, StreamError, read_stream
from prequel.verify.fast_decode import decode as fast_decode

STREAM_NAME = "stream.prequel"


def find_stream(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / STREAM_NAME
    if not path.is_file():
        raise StreamError(f"no stream at {path} (give a run directory or a {STREAM_NAME} file)")
    return path


@dataclass
class Checked:
    """Bob, set up from a header that passed every check, and what differs from the encoder's machine."""

    bob: Receiver
    environment_differences: list[str] = field(default_factory=list)

    def code_length(self) -> CodeLength:
        bob = self.bob
        return CodeLength(
            f_parts(bob.config, counted_yaml(bob.config), bob.tokenizer.serialize(), order_bits(bob.labels)),
            bob.header.data_tokens,
        )

    def explain(self, error: StreamError) -> StreamError:
        """A decoding error, naming the likely cause when the user accepted a different environment."""
        if not self.environment_differences:
            return error
        return StreamError(
            f"{error} (the environment differs from the encoder's: {'; '.join(self.environment_differences)})"
        )


def checked_receiver(stream: Stream, allow_env_mismatch: bool = False, threads: int | None = None) -> Checked:
    """f from the stream header, checked against this code and machine, set up to replay."""
    header = headers.checked_header(stream.header)
    headers.checked_tokenizer(header)  # its blob's content and real vocabulary size
    if header.code_hash != code_hash():
        raise StreamError(
            "the stream was written by different prequel source code (code hash differs); "
            "check out the commit that wrote it"
        )
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ConfigError(f"--threads: must be in 1..{MAX_THREADS}, got {threads}")
    try:
        require_device(header.environment)  # before the config's accelerator is used
        bob = receiver(header, threads)
        diffs = check_environment(
            header.environment,
            bob.config.trainer.kernels,
            bob.config.trainer.accelerator,
            allow_env_mismatch,
            error=StreamError,
        )
    except KernelError as e:
        raise StreamError(str(e)) from None
    return Checked(bob, diffs)


def replay(checked: Checked, module, datamodule, trainer, ckpt_path: Path | None = None) -> None:
    """Train as the encoder did (decoding as the callbacks say) from a checkpoint: the audit's stretches."""
    try:
        trainer.fit(module, datamodule, ckpt_path=ckpt_path, weights_only=True)
    except StreamError as e:
        raise checked.explain(e) from None


def verify(
    path: Path, out: Path | None = None, allow_env_mismatch: bool = False, threads: int | None = None, fast: bool = True
) -> dict | None:
    """Bob: rebuild f from the stream header, replay training while decoding, check everything.
    A run of N processes replays with N (Lightning starts the others); rank 0 reports, the others
    return None. `fast`: decode `full` batches by checked single steps where they give f's bits
    (prequel/verify/fast_decode.py); the decoded bits are the same either way."""
    stream_path = find_stream(path)
    stream = read_stream(stream_path)
    checked = checked_receiver(stream, allow_env_mismatch, threads)
    code_length = checked.code_length()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prequel-verify-") as tape_dir:  # Bob's tape: shard files
        try:
            tape, module, decoder = (fast_decode if fast else decode)(
                checked.bob, stream, [code_length], Path(tape_dir)
            )
        except StreamError as e:
            raise checked.explain(e) from None
        seconds = time.perf_counter() - started
        totals = code_length.totals()  # (synced: every process takes part)
        if tape is None:
            return None
        expected_sha = stream.trailer.get("data_sha256")
        out = (Path(out) if out else stream_path.with_suffix(".decoded")) if expected_sha is not None else None
        digest, nbytes = _decoded_output(tape.decoded(checked.bob.tokenizer), out, expected_sha)
    weights_checked = _compare_checkpoint(Path(path), module)
    report = {
        "stream": str(stream_path),
        "tokens": decoder.coded_tokens,
        "bytes": nbytes,
        "ideal_bits": totals["data_bits"],
        "stream_bits": stream.payload_bits,
        "overhead_bits": stream.payload_bits - totals["data_bits"],
        "sha256": digest,
        "complete": expected_sha is not None,
        "final_weights_equal_checkpoint": weights_checked,
        "environment_differences": checked.environment_differences,
        "seconds": seconds,
        "fast_batches": getattr(decoder, "fast_batches", 0),
        "slow_batches": getattr(decoder, "slow_batches", 0),
    }
    if out is not None:
        report["output"] = str(out)
    return report


def _decoded_output(pieces, out: Path | None, expected_sha: str | None) -> tuple[str, int]:
    """(sha256, bytes) of the decoded pieces; with `out`, also written there (atomically), and
    kept only if the sha256 is the original's."""
    digest, nbytes = hashlib.sha256(), 0

    def hashed():
        nonlocal nbytes
        for piece in pieces:
            digest.update(piece)
            nbytes += len(piece)
            yield piece

    if out is None:
        for _ in hashed():
            pass
    else:
        tmp = out.with_name(f".{out.name}.unchecked{TEMP_SUFFIX}")
        try:
            write_atomic(tmp, hashed())
            if expected_sha is not None and digest.hexdigest() != expected_sha:
                raise StreamError("decoded bytes do not match the original's sha256")
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
    if expected_sha is not None and digest.hexdigest() != expected_sha:
        raise StreamError("decoded bytes do not match the original's sha256")
    return digest.hexdigest(), nbytes


def _compare_checkpoint(path: Path, module: PrequelModule) -> bool | str | None:
    """Final weights bitwise equal to the encoder's final checkpoint, when it sits beside the stream
    (None: no checkpoint; a string: why it could not be read; the stream's own checks still hold)."""
    ckpt = (path if path.is_dir() else path.parent) / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        return None
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as e:  # damaged or foreign file: pickle, zip and torch errors alike
        return (
            f"the checkpoint {ckpt} beside the stream cannot be read ({type(e).__name__}); final weights not compared"
        )
    ours = module.state_dict()
    if state.keys() != ours.keys() or not all(torch.equal(state[k], ours[k].cpu()) for k in ours):
        raise StreamError(f"decoded training ended with weights that differ from the encoder's checkpoint {ckpt}")
    return True
