"""Alice's side of the stream, which Bob does not need and f does not hold (prequel/program.py).

`Encoder` queues a segment's intervals and rANS-codes them backwards when the segment is sealed;
`encode_known` queues a batch whose intervals the training forward has all given
(training/coding.py `logit_intervals`, computed while the logits exist), in `code_batch`'s
column-major order, so the very words Bob's column-by-column `code_batch` decodes
(tests/test_stream.py). A segment is sealed at every checkpoint, at the end, and once it codes
`SEGMENT_TOKENS` tokens, so Alice holds at most that many intervals. `StreamEncoder` is the
callback that does it after every first-pass batch; `state_sha256` fingerprints the training
state at each checkpoint for the audit (prequel/verify/audit.py). `write_stream` writes a stream
file (the layout: training/stream.py).
"""

import hashlib
import json
from pathlib import Path

import lightning as L
import numba
import numpy as np
import torch

from prequel.alice import background
from prequel.alice.background import Worker, to_host
from prequel.callbacks.arithmetic_stream import StreamCallback, parameters_sha256
from prequel.callbacks.contract import ContractError, StreamCoded, StreamModule, require, require_coded
from prequel.files import write_atomic
from prequel.training.coding import LOW, WORD, P, intervals
from prequel.training.data import IGNORE, Tape
from prequel.training.module import PrequelModule
from prequel.training.stream import Segment, Stream, encode_stream

_SHIFT = (LOW >> P).bit_length() - 1 + WORD  # a state at or above f << _SHIFT emits a word first
SEGMENT_TOKENS = 1 << 22  # a segment is sealed once it codes this many tokens (Alice's memory: 24 bytes each)


def write_stream(path: Path, stream: Stream) -> int:
    data = encode_stream(stream)
    write_atomic(path, data)
    return len(data)


@numba.njit(cache=True, nogil=True)
def _encode(lanes, start, freq, n_lanes, out):  # pragma: no cover (compiled)
    """rANS-encode the intervals backwards (Bob decodes forwards), pushing words onto `out`, then
    every lane's final state; returns the number of words pushed (read back reversed)."""
    states = np.full(n_lanes, LOW, np.int64)
    n = 0
    for i in range(len(lanes) - 1, -1, -1):
        x, f = states[lanes[i]], freq[i]
        while x >= f << _SHIFT:
            out[n] = x & 0xFFFF
            n += 1
            x >>= WORD
        states[lanes[i]] = ((x // f) << P) + x % f + start[i]
    for lane in range(n_lanes - 1, -1, -1):
        for shift in range(0, 64, WORD):
            out[n] = (states[lane] >> shift) & 0xFFFF
            n += 1
    return n


class Encoder:
    """Collects a segment's intervals in Bob's decoding order; `words` codes them (rANS is last in,
    first out, so nothing is coded before the segment is sealed)."""

    def __init__(self):
        self._lanes: list[np.ndarray] = []
        self._intervals: list[np.ndarray] = []
        self.lanes = 1  # lanes in use: one more than the highest queued

    def code(self, probs: torch.Tensor, symbols: torch.Tensor, lanes: np.ndarray) -> torch.Tensor:
        """Queue `symbols` (R,), row r with the probabilities `probs[r]` on lane `lanes[r]`; returns them."""
        self.add(lanes, intervals(probs, symbols).cpu().numpy())
        return symbols

    def add(self, lanes: np.ndarray, spans: np.ndarray) -> None:
        """Queue symbols by their intervals (N, 2) (start, frequency), in decoding order."""
        self._lanes.append(np.asarray(lanes, dtype=np.int64))
        self._intervals.append(np.asarray(spans, dtype=np.int64))
        self.lanes = max(self.lanes, 1 + int(self._lanes[-1].max(initial=0)))

    def words(self) -> np.ndarray:
        """The segment so far as 16-bit words (sealed: decodable as is, with `lanes` lanes)."""
        lanes = np.concatenate([np.zeros(0, np.int64), *self._lanes])
        spans = np.concatenate([np.zeros((0, 2), np.int64), *self._intervals])
        out = np.empty(2 * len(lanes) + 4 * self.lanes, dtype=np.int64)
        n = _encode(lanes, np.ascontiguousarray(spans[:, 0]), np.ascontiguousarray(spans[:, 1]), self.lanes, out)
        return out[:n][::-1].astype(np.uint16)

    def num_bits(self) -> int:
        return WORD * len(self.words())


def encode_known(spans, targets, encoder: Encoder) -> None:
    """Queue a batch whose intervals (B, L, 2) the training forward has all given
    (training.coding.logit_intervals): in `code_batch`'s column-major order, row r on lane r,
    hence the same words as Bob's column-by-column decoding (tested). Arrays or CPU tensors."""
    spans, targets = np.asarray(spans), np.asarray(targets)
    present = targets.T != IGNORE  # (L, B): column-major
    lanes = np.broadcast_to(np.arange(len(targets)), present.shape)
    encoder.add(lanes[present], spans.transpose(1, 0, 2)[present])


def state_sha256(trainer: L.Trainer, pl_module: L.LightningModule, tokens_hash: str) -> str:
    """Everything that decides the bits of the rest of the run, at a step boundary: the weights
    and buffers (n-gram counts, a mixture's weights), the optimizers' and LR schedulers' states,
    the step and the hash chain of the tokens coded so far. Not the RNG: nothing that changes
    bits draws from it once the model is built (the stream refuses dropout)."""
    h = hashlib.sha256(bytes.fromhex(parameters_sha256(pl_module)) + bytes.fromhex(tokens_hash))
    for optimizer in trainer.optimizers:
        state = optimizer.state_dict()
        for index in sorted(state["state"]):
            for key, value in sorted(state["state"][index].items()):
                h.update(f"{index}.{key}".encode())
                h.update(
                    torch.as_tensor(value).detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                )
        h.update(json.dumps(state["param_groups"], sort_keys=True, default=repr).encode())
    for config in trainer.lr_scheduler_configs:
        h.update(json.dumps(config.scheduler.state_dict(), sort_keys=True, default=repr).encode())
    h.update(str(trainer.global_step).encode())
    return h.hexdigest()


class StreamEncoder(StreamCallback):
    """Alice: codes each first-pass batch into `self.stream`; `save` writes it."""

    def __init__(
        self, tape: Tape, checksum_every: int, procedure: str = "full", *, header: dict, background: int | None = None
    ):
        super().__init__(tape, checksum_every, procedure, Stream(header, [], {}))
        self.coder = Encoder()
        # batches the coder may lag behind training (0: code in the hook; None: background.DEPTH)
        self.background = background
        self._worker = Worker(0)  # (setup starts the thread)
        self._segment_start = 0  # coded_batches when the open segment began
        self._segment_tokens = 0  # the tokens counted when it began
        self._queued_tokens = 0  # tokens of the batches handed to the worker (coded_tokens, once it is done)
        self.boundaries: list[dict] = []  # per checkpoint: step, coded batches, state_sha256
        self._coded_checked = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        require(pl_module, StreamModule, "StreamEncoder")
        if not isinstance(pl_module, PrequelModule):  # Bob rebuilds f's module from the header, no other
            raise ContractError(
                f"StreamEncoder: {type(pl_module).__name__} is not prequel's PrequelModule, and "
                "`verify` decodes a stream by rebuilding that module from the header: f does not "
                "hold another module's code. Measure it with CodeLength alone (no stream)."
            )
        self._coded_checked = False
        pl_module.code_intervals = self.procedure == "full"  # (incremental: coded before the step, by steps)
        super().setup(trainer, pl_module, stage)
        # full: a batch's integers are coded on a background thread; incremental codes before the
        # step on this one (its coder is fed column by column), so it keeps the work here too.
        self._worker.close()
        depth = background.DEPTH if self.background is None else self.background
        self._worker = Worker(depth if self.procedure == "full" else 0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.procedure == "incremental" and pl_module.is_first_pass(batch):
            self._code_before_step(trainer, pl_module, self.tape.batch(batch["spans"])[1], batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._coded_checked:
            require_coded(pl_module, StreamCoded, "StreamEncoder")
            self._coded_checked = True
        coded = pl_module.coded
        if not coded.first_pass:
            return
        # This thread only starts the copies and counts; the coding and hashing wait on the copies
        # in the worker. Every process's tokens count (the whole batch), from the host's spans.
        spans, targets = to_host(coded.intervals if self.procedure == "full" else None), to_host(coded.targets)
        whole = None if self.world == 1 else self.tape.batch(batch["all_spans"])[1]
        self.coded_batches += 1
        self._queued_tokens += int(batch["all_spans"][:, 1].sum())
        key = str(self.coded_batches) if self.coded_batches % self.checksum_every == 0 else None
        params = parameters_sha256(pl_module) if key else None  # (the weights after this step, as Bob's)
        self._worker.submit(lambda: self._code(spans, targets, whole, key, params), f"batch {self.coded_batches}")
        if self._queued_tokens - self._segment_tokens >= SEGMENT_TOKENS:
            self._seal()

    def _code(self, spans, targets, whole, key: str | None, params: str | None) -> None:
        """One batch, in order: its intervals onto the open segment, its tokens into the hash chain."""
        targets = targets.numpy()
        if spans is not None:
            encode_known(spans.numpy(), targets, self.coder)
        self._chain(targets if whole is None else whole.numpy())
        if key:
            self.checksums[key] = {"tokens": self.tokens_hash, "params": params}

    def on_train_end(self, trainer, pl_module) -> None:
        self._seal()
        self._worker.drain()
        self._check("final", pl_module)
        self._worker.close()
        self.stream.trailer.update(
            coded_tokens=self.coded_tokens, coded_batches=self.coded_batches, checksums=self.checksums
        )

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._worker.close()  # (what it still holds is lost with the run; a checkpoint resumes it)

    def _seal(self) -> None:
        """Close the open segment: one sub-stream per process (in rank order), the same on all. On
        one process the worker seals it after the batches before it; with several, the processes
        gather their segments here (a collective belongs on the training thread)."""
        if self.coded_batches == self._segment_start:
            return
        batches, self._segment_start, self._segment_tokens = (
            self.coded_batches - self._segment_start,
            self.coded_batches,
            self._queued_tokens,
        )
        if self.world == 1:
            end = f"the segment ending at batch {self.coded_batches}"
            self._worker.submit(lambda: self._close_segment(batches), end)
        else:
            self._worker.drain()
            self._close_segment(batches)

    def _close_segment(self, batches: int) -> None:
        sealed = [(self.coder.lanes, self.coder.words())]
        if self.world > 1:  # (every process seals at the same batch: checkpoints and the end are global)
            sealed = [None] * self.world
            torch.distributed.all_gather_object(sealed, (self.coder.lanes, self.coder.words()))
        self.stream.segments += [Segment(batches, lanes, words) for lanes, words in sealed]
        self.coder = Encoder()

    def save(self, path, trailer_extra: dict) -> int:
        """Write the finished stream; returns its size in bytes."""
        self.stream.trailer.update(trailer_extra, boundaries=self.boundaries)
        return write_stream(path, self.stream)

    def state_dict(self) -> dict:
        self._seal()  # the checkpoint holds a stream that decodes up to exactly this batch
        self._worker.drain()
        trainer = self._trainer
        if trainer is not None and not (self.boundaries and self.boundaries[-1]["step"] == trainer.global_step):
            self.boundaries.append(
                {
                    "step": trainer.global_step,
                    "batches": self.coded_batches,
                    "state": state_sha256(trainer, trainer.lightning_module, self.tokens_hash),
                }
            )
        return {**super().state_dict(), "boundaries": list(self.boundaries)}

    def load_state_dict(self, state: dict) -> None:
        self.boundaries = list(state["boundaries"])
        self.stream.segments = [Segment(b, lanes, w.numpy().astype(np.uint16)) for b, lanes, w in state["segments"]]
        self._load_position(state)
        self._segment_start = self.coded_batches
        self._segment_tokens = self._queued_tokens = self.coded_tokens
        self.coder = Encoder()
