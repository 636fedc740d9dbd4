"""Alice's side of the stream, which Bob does not need and f does not hold (prequel/program.py).

`Encoder` queues a batch's symbols for the range coder; `encode_known` codes a batch whose logits
the training forward has all given, in `code_batch`'s column-major order through the same
`coding_probabilities` (training/coding.py), so the very words Bob's column-by-column `code_batch`
decodes (tests/test_stream.py). `StreamEncoder` is the callback that does it after every first-pass
batch; `state_sha256` fingerprints the training state at each checkpoint for the audit
(prequel/verify/audit.py). `write_stream` writes a stream file (the layout: training/stream.py).
"""

import hashlib
import json
from pathlib import Path

import constriction
import lightning as L
import numpy as np
import torch

from prequel.callbacks.arithmetic_stream import StreamCallback, parameters_sha256
from prequel.callbacks.contract import ContractError, StreamCoded, StreamModule, require, require_coded
from prequel.files import write_atomic
from prequel.training.coding import MODEL, coding_probabilities
from prequel.training.data import IGNORE, Tape
from prequel.training.module import PrequelModule
from prequel.training.stream import Segment, Stream, encode_stream

_ONE_PASS_FLOATS = 1 << 20  # probabilities an Encoder codes per constriction call, at most


def write_stream(path: Path, stream: Stream) -> int:
    data = encode_stream(stream)
    write_atomic(path, data)
    return len(data)


class Encoder:
    """Queues symbols and codes them in one call per batch (`flush`): a queue coder gives the
    same bits as one call per column, without paying constriction's per-call cost 64 times."""

    def __init__(self):
        self._coder = constriction.stream.queue.RangeEncoder()
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []

    def code(self, symbols: torch.Tensor, probs: np.ndarray) -> torch.Tensor:
        """Encode `symbols` (R,), row r with the probabilities `probs[r]` (R, V); returns them."""
        self._pending.append((symbols.numpy().astype(np.int32), probs))
        return symbols

    def flush(self) -> None:
        runs: list[tuple[list, list]] = []  # consecutive rows of one width (top-k mixes widths)
        for symbols, probs in self._pending:
            if runs and runs[-1][1][-1].shape[1] == probs.shape[1]:
                runs[-1][0].append(symbols), runs[-1][1].append(probs)
            else:
                runs.append(([symbols], [probs]))
        for symbols, probs in runs:
            self._coder.encode(np.concatenate(symbols), MODEL, np.concatenate(probs))
        self._pending = []

    def words(self) -> np.ndarray:
        """The stream so far as 32-bit words (sealed: decodable as is)."""
        self.flush()
        return self._coder.get_compressed()

    def num_bits(self) -> int:
        self.flush()
        return int(self._coder.num_bits())


def encode_known(logits: torch.Tensor, targets: torch.Tensor, encoder: Encoder) -> None:
    """Encode `targets` (B, L) when all the logits (B, L, V) are known before coding (Alice with
    the training forward): the same rows through the same `coding_probabilities` (row-wise, so
    the batch shape cannot change its bits) in `code_batch`'s column-major order, hence the same
    words (tested), in a few passes instead of L, at a tenth of the cost."""
    present = targets != IGNORE
    b, length, vocab = logits.shape
    step = max(1, _ONE_PASS_FLOATS // (b * vocab))  # columns per pass: bounded memory at large V
    for t in range(0, length, step):
        columns = logits[:, t : t + step].detach().transpose(0, 1)  # column-major, as code_batch codes
        rows = present[:, t : t + step].T
        probs = coding_probabilities(columns.flatten(0, 1))[rows.flatten().numpy()]
        encoder.code(targets[:, t : t + step].T[rows], probs)
    encoder.flush()


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

    def __init__(self, tape: Tape, checksum_every: int, procedure: str = "full", *, header: dict):
        super().__init__(tape, checksum_every, procedure, Stream(header, [], {}))
        self.coder = Encoder()
        self._segment_start = 0  # coded_batches when the open segment began
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
        super().setup(trainer, pl_module, stage)

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
        targets = coded.targets.cpu()
        if self.procedure == "full":  # with the training forward's logits: all known, one pass
            encode_known(coded.logits, targets, self.coder)
        self._record(self._whole_batch(batch, targets), pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._seal()
        super().on_train_end(trainer, pl_module)
        self.stream.trailer.update(
            coded_tokens=self.coded_tokens, coded_batches=self.coded_batches, checksums=self.checksums
        )

    def _seal(self) -> None:
        """Close the open segment: one sub-stream per process (in rank order), the same on all."""
        if self.coded_batches > self._segment_start:
            words = [self.coder.words()]
            if self.world > 1:  # (every process seals at the same batch: checkpoints and the end are global)
                words = [None] * self.world
                torch.distributed.all_gather_object(words, self.coder.words())
            self.stream.segments += [Segment(self.coded_batches - self._segment_start, w) for w in words]
            self._segment_start = self.coded_batches
            self.coder = Encoder()

    def save(self, path, trailer_extra: dict) -> int:
        """Write the finished stream; returns its size in bytes."""
        self.stream.trailer.update(trailer_extra, boundaries=self.boundaries)
        return write_stream(path, self.stream)

    def state_dict(self) -> dict:
        self._seal()  # the checkpoint holds a stream that decodes up to exactly this batch
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
        self.stream.segments = [Segment(b, w.numpy().astype(np.uint32)) for b, w in state["segments"]]
        self._load_position(state)
        self._segment_start = self.coded_batches
        self.coder = Encoder()
