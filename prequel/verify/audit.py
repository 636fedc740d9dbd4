"""Audit a run in parallel: `prequel verify RUN --jobs N`, or one stretch: `--segment K`.

`verify` proves a stream by replaying the whole run in one process. A run that kept its
checkpoints (`trainer.keep_checkpoints`) can be checked in stretches instead, each in its own
process or on its own machine (a Slurm array: `--segment $SLURM_ARRAY_TASK_ID`). The stream's
trailer records, for every checkpoint, its step and `state_sha256` (weights and buffers, n-gram
counts included; optimizer and LR-scheduler states; the step; the hash chain of the tokens coded
so far). Stretch K starts from the K-th recorded checkpoint (stretch 0 from the run's start),
first checks that the file is in the recorded state, then decodes its part of the stream while
training, compares every decoded token with the original data, checks every recorded state it
passes, and must stop exactly in the state recorded for the next checkpoint: stretch K's end is
stretch K + 1's checked start, so by induction every stretch starts where a full replay would
be, and the stretches together prove what `verify` proves. The last stretch also runs verify's
final checks (all tokens, final weights). The original data is needed, and not only for the
comparison: replay steps read tokens of earlier stretches.

Outside f: Bob decodes with `verify`; this only schedules the same decoding differently.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from prequel.alice.encoder import StreamEncoder, state_sha256
from prequel.alice.shards import open_corpus, token_shards
from prequel.training.data import Tape
from prequel.training.run import Receiver
from prequel.training.stream import Stream, StreamError, read_stream
from prequel.verify.fast_decode import FastStreamDecoder
from prequel.verify.verifier import checked_receiver, find_stream, replay

REPORT_PREFIX = "audit-report "  # the line a `--segment` process prints for `audit` to read


@dataclass
class Stretch:
    index: int
    checkpoint: Path | None  # where it starts; None: the run's start
    start: dict | None  # the boundary it starts at (step, batches, state)
    end: dict | None  # the boundary it must stop at; None: the end of the run

    def describe(self) -> str:
        first = 0 if self.start is None else self.start["step"]
        return f"steps {first}..{'end' if self.end is None else self.end['step']}"


def stretches(run_dir: Path, stream: Stream) -> list[Stretch]:
    """One stretch from the start and one from each recorded checkpoint but the last (the run's end)."""
    if stream.header["config"]["trainer"]["devices"] > 1:
        raise StreamError(
            "the audit replays stretches in one process each; this run trained in "
            f"{stream.header['config']['trainer']['devices']}: verify it whole (without --jobs/--segment)"
        )
    boundaries = stream.trailer.get("boundaries")
    if not boundaries:
        raise StreamError(
            "the stream records no checkpoint states: written by older code, or the run never "
            "checkpointed; verify it in one process (prequel verify without --jobs/--segment)"
        )
    inner = boundaries[:-1]
    starts = [None, *inner]
    return [
        Stretch(
            i,
            None if start is None else run_dir / "checkpoints" / f"step={start['step']}.ckpt",
            start,
            inner[i] if i < len(inner) else None,
        )
        for i, start in enumerate(starts)
    ]


def _missing(plan: list[Stretch]) -> list[str]:
    return [
        f"stretch {s.index} starts from {s.checkpoint}, which is missing"
        for s in plan
        if s.checkpoint is not None and not s.checkpoint.is_file()
    ]


class AuditDecoder(FastStreamDecoder):
    """Bob from a checkpoint: decodes one stretch against the data and checks its two ends (each batch by
    checked steps where they give f's bits: prequel/verify/fast_decode.py)."""

    def __init__(self, bob: Receiver, tape: Tape, data: torch.Tensor, stream: Stream, stretch: Stretch):
        super().__init__(tape, bob.config.stream.checksum_every, bob.config.stream.procedure, stream=stream)
        self.data, self.stretch = data, stretch
        self.recorded = {(b["step"], b["batches"]): b["state"] for b in stream.trailer["boundaries"]}
        self.checked: list[int] = []  # steps whose recorded state this stretch reproduced

    @property
    def state_key(self) -> str:
        return StreamEncoder.__qualname__  # the encoder's state in the checkpoint: where decoding resumes

    def load_state_dict(self, state: dict) -> None:
        sealed = [batches for batches, _lanes, _words in state["segments"]]
        if sealed != [segment.batches for segment in self.stream.segments[: len(sealed)]]:
            raise StreamError(
                f"{self._name()}: {self.stretch.checkpoint} holds other stream segments than the "
                "stream: it is not a checkpoint of this run"
            )
        self._load_position(state)
        self._segment, self._segment_end = len(sealed) - 1, self.coded_batches  # the next batch opens the next

    def _name(self) -> str:
        return f"stretch {self.stretch.index} ({self.stretch.describe()})"

    def on_train_start(self, trainer, pl_module) -> None:
        start = self.stretch.start
        if start is None:
            return
        at = (trainer.global_step, self.coded_batches)
        if (
            at != (start["step"], start["batches"])
            or state_sha256(trainer, pl_module, self.tokens_hash) != start["state"]
        ):
            raise StreamError(
                f"{self._name()}: {self.stretch.checkpoint} is not in the state the stream records for "
                f"step {start['step']}: the checkpoint was altered, or is of another run"
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if not pl_module.is_first_pass(batch):
            return
        pos, valid = self.tape.positions(batch["spans"])
        if not torch.equal(self.tape.tokens[pos[valid]], self.data[pos[valid]]):
            raise StreamError(
                f"{self._name()}: batch {self.coded_batches + 1} (stream segment {self._segment}) "
                "decodes to other tokens than the data's: that part of the stream was altered"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._check_state(trainer, pl_module)
        end = self.stretch.end
        if end is not None and (trainer.global_step, self.coded_batches) == (end["step"], end["batches"]):
            trainer.should_stop = True

    def _check_state(self, trainer, pl_module) -> None:
        at = (trainer.global_step, self.coded_batches)
        if at not in self.recorded or trainer.global_step in self.checked:
            return
        if state_sha256(trainer, pl_module, self.tokens_hash) != self.recorded[at]:
            raise StreamError(
                f"{self._name()}: after step {at[0]} the training state differs from the one the stream "
                "records for its checkpoint there"
            )
        self.checked.append(trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        end = self.stretch.end
        if end is None:  # the run's end: verify's final checks (every batch decoded, final weights)
            self._check_state(trainer, pl_module)
            return super().on_train_end(trainer, pl_module)
        if (trainer.global_step, self.coded_batches) != (end["step"], end["batches"]):
            raise StreamError(f"{self._name()}: training ended at step {trainer.global_step}, before the stretch's end")
        self._close_segment()  # the segment sealed at this checkpoint: all its words used


def audit_segment(
    path: Path, index: int, data_path: str | None = None, threads: int | None = None, allow_env_mismatch: bool = False
) -> dict:
    """Check stretch `index` of the run at `path` (a run directory or its stream) against the data."""
    stream_path = find_stream(path)
    stream = read_stream(stream_path)
    plan = stretches(stream_path.parent, stream)
    if not 0 <= index < len(plan):
        raise StreamError(f"--segment {index}: the run has stretches 0..{len(plan) - 1}")
    stretch = plan[index]
    if missing := _missing([stretch]):
        raise StreamError(f"{missing[0]}: the audit starts each stretch from a checkpoint the run kept")
    checked = checked_receiver(stream, allow_env_mismatch, threads)
    bob = checked.bob
    corpus = open_corpus(data_path if data_path is not None else bob.config.data.path)
    expected_sha = stream.trailer.get("data_sha256")
    if expected_sha is not None and corpus.sha256() != expected_sha:
        raise StreamError(f"--data: {data_path or 'the bundled data'} is not the data of this run (sha256 differs)")
    tokens = token_shards(corpus, bob.tokenizer)  # (the cache Alice trained from, if it is on this machine)
    if len(tokens) != bob.header.data_tokens:
        raise StreamError(f"--data: {len(tokens):,} tokens, the run coded {bob.header.data_tokens:,}")
    # Bob's tape: the data's shards, copy-on-write (what he decodes lands in memory, never in the cache)
    tape = Tape(tokens.copy_on_write(), bos_id=bob.tokenizer.vocab_size, nbytes_per_id=bob.tokenizer.nbytes_per_id())
    decoder = AuditDecoder(bob, tape, tokens, stream, stretch)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        replay(checked, *bob.trainer(tape, [checked.code_length(), decoder], Path(tmp)), ckpt_path=stretch.checkpoint)
    return {
        "stretch": index,
        "steps": stretch.describe(),
        "checkpoint": str(stretch.checkpoint or "start"),
        "batches": decoder.coded_batches - (stretch.start or {"batches": 0})["batches"],
        "states_checked": decoder.checked,
        "seconds": time.perf_counter() - started,
        "ok": True,
    }


def _from_here(spec: str) -> str:
    """A data.path (file, directory or glob) relative to this process's directory, made absolute;
    a `dataset:NAME` stays as it is."""
    return spec if spec.startswith("dataset:") or Path(spec).is_absolute() else str(Path.cwd() / spec)


def audit(
    path: Path, jobs: int, data_path: str | None = None, threads: int | None = None, allow_env_mismatch: bool = False
) -> dict:
    """Every stretch, `jobs` at a time, each in its own `prequel verify --segment K` process."""
    stream_path = find_stream(path)
    stream = read_stream(stream_path)
    plan = stretches(stream_path.parent, stream)
    if missing := _missing(plan):
        raise StreamError(
            f"{'; '.join(missing)}: the audit starts each stretch from a checkpoint the run kept "
            "(prequel verify without --jobs replays the whole run instead)"
        )
    if data_path is None and stream.header["config"]["data"]["path"] is not None:
        data_path = stream.header["config"]["data"]["path"]  # the run's, relative to here as for prequel
    # Each job keeps the encoder's thread count (with native kernels it changes bits); jobs that
    # share cores must then not busy-wait for each other.
    threads = threads or stream.header["config"]["trainer"]["num_threads"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}

    def run(stretch: Stretch) -> dict:
        # (absolute paths: the user's paths may be relative to another directory than this process's)
        cmd = [
            sys.executable,
            "-P",
            "-m",
            "prequel",
            "verify",
            str(stream_path.resolve()),
            "--segment",
            str(stretch.index),
        ]
        cmd += ["--threads", str(threads)] if threads else []
        cmd += ["--data", _from_here(data_path)] if data_path is not None else []
        cmd += ["--allow-env-mismatch"] if allow_env_mismatch else []
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        for line in r.stdout.splitlines():
            if line.startswith(REPORT_PREFIX) and r.returncode == 0:
                return json.loads(line[len(REPORT_PREFIX) :])
        lines = (r.stderr or r.stdout).strip().splitlines()
        reason = lines[-1].split("error: ", 1)[-1] if lines else f"exit status {r.returncode}"
        return {"stretch": stretch.index, "steps": stretch.describe(), "ok": False, "error": reason}

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(run, plan))
    return {
        "stream": str(stream_path),
        "jobs": jobs,
        "threads": threads,
        "stretches": results,
        "ok": all(r["ok"] for r in results),
        "seconds": time.perf_counter() - started,
    }
