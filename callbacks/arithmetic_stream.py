"""Alice and Bob as two callbacks: encode the first pass into a stream, or decode it back.

`StreamEncoder` (Alice, prequel/alice/encoder.py: not part of f): after each first-pass batch, code its
targets with the probabilities of the training forward that just ran (weights from before the
step). `StreamDecoder` (Bob): before each first-pass batch, fill the tape by decoding with the
current weights; the same `training_step` then learns it. Both call `training.coding`, and both
keep what `StreamCallback` keeps: a hash chain of the tokens coded so far and a hash of the
parameters every `checksum_every` batches. Alice writes those checks into the stream; Bob
compares, so he names the first batch where anything drifted instead of producing garbage.

The stream is a list of rANS segments (training/coding.py). Every checkpoint makes Alice seal the open one and
store the sealed segments in the checkpoint, so a run resumed from it continues the stream bit
for bit where it left off; Bob opens each segment where the one before it ended. Alice also
records each checkpoint's `state_sha256` in the trailer (`boundaries`), so an audit can start
from a checkpoint it can trust and check where each stretch of the run must end (prequel/verify/audit.py).
"""

import hashlib

import lightning as L
import numpy as np
import torch

from prequel.training.coding import Decoder, code_batch
from prequel.training.data import IGNORE, Tape
from prequel.training.stream import Stream, StreamError


def parameters_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class StreamCallback(L.Callback):
    """What both sides do identically: code a batch before the step (Bob always, Alice when
    incremental), and after it count and hash what was coded, checking every `checksum_every`."""

    def __init__(self, tape: Tape, checksum_every: int, procedure: str, stream: Stream):
        self.tape = tape
        self.checksum_every = checksum_every
        self.procedure = procedure  # "full" or "incremental": how column t's logits are computed
        self.stream = stream
        self.tokens_hash = hashlib.sha256().hexdigest()  # chained per batch, so it can be checkpointed
        self.coded_tokens = 0
        self.coded_batches = 0
        self.checksums: dict[str, dict] = {}
        self.coder = None  # a prequel.alice.encoder.Encoder (Alice) or a training.coding.Decoder (Bob)
        self._trainer: L.Trainer | None = None
        self.rank, self.world = 0, 1  # with DDP, each process codes its rows into its own sub-stream

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer  # state_dict (a checkpoint) hashes the training state
        self.rank, self.world = trainer.global_rank, trainer.world_size

    def _code_before_step(self, trainer, pl_module, targets: torch.Tensor, batch: dict) -> None:
        """Encode `targets` (B, L), or decode into them, with the weights from before the step:
        column t's logits from what is known before column t, by the configured procedure.

        ``full``: the model on the whole (B, L) batch, positions >= t holding anything (causal
        attention ignores them), bitwise equal to the training forward: L forwards per batch
        for Bob, none extra for Alice (she codes after the step). ``incremental``: a KV-cache
        step per column, the same steps on both sides: about one forward per batch for each
        (but not the training forward's bits, so Alice runs it too)."""
        if self.procedure == "full":
            before = self.tape.before(batch["spans"], batch.get("known"))

            def logits_at(t: int) -> torch.Tensor:
                return pl_module(self.tape.inputs(targets, before).to(pl_module.device))[:, t]
        else:
            from prequel.models.kv_cache import incremental_logits  # (in f only for an incremental run)

            logits_at = incremental_logits(pl_module.model, targets, self.tape.bos_id)
        mixer = pl_module.model.column_mixer(len(targets), pl_module.device) if pl_module.is_mixture else None
        with torch.no_grad(), trainer.precision_plugin.train_step_context():
            try:
                code_batch(logits_at, targets, self.coder, mixer=mixer)
            except StreamError as e:
                raise StreamError(f"batch {self.coded_batches + 1}: {e}") from None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.coded.first_pass:
            self._record(self._whole_batch(batch, pl_module.coded.targets), pl_module)

    def _whole_batch(self, batch: dict, targets: torch.Tensor) -> torch.Tensor:
        """The targets of every process's rows (this process's `targets` without DDP): from the
        tape, which holds them all by the end of a batch (Bob gathers what the others decoded)."""
        return targets.cpu() if self.world == 1 else self.tape.batch(batch["all_spans"])[1]

    def _record(self, targets: torch.Tensor, pl_module: L.LightningModule) -> None:
        """Chain the batch's coded tokens (all processes') into the hash; every `checksum_every`
        batches, check."""
        self._chain(targets.numpy())
        self.coded_batches += 1
        if self.coded_batches % self.checksum_every == 0:
            self._check(str(self.coded_batches), pl_module)

    def _chain(self, targets: np.ndarray) -> None:
        """The hash chain and count of coded tokens, on by one batch's (B, L) targets (numpy only:
        Alice runs it on her background thread, prequel/alice/background.py)."""
        symbols = targets[targets != IGNORE].astype(np.int32)
        self.tokens_hash = hashlib.sha256(bytes.fromhex(self.tokens_hash) + symbols.tobytes()).hexdigest()
        self.coded_tokens += len(symbols)

    def on_train_end(self, trainer, pl_module) -> None:
        self._check("final", pl_module)

    def _check(self, key: str, pl_module: L.LightningModule) -> None:
        self.checksums[key] = {"tokens": self.tokens_hash, "params": parameters_sha256(pl_module)}

    def state_dict(self) -> dict:
        return {
            "segments": [
                (s.batches, s.lanes, torch.from_numpy(s.words.astype(np.int64))) for s in self.stream.segments
            ],
            "tokens_hash": self.tokens_hash,
            "coded_tokens": self.coded_tokens,
            "coded_batches": self.coded_batches,
            "checksums": self.checksums,
        }

    def _load_position(self, state: dict) -> None:
        """Where `state_dict` left the coded tokens: their hash chain, counts and checksums."""
        self.tokens_hash, self.checksums = state["tokens_hash"], dict(state["checksums"])
        self.coded_tokens, self.coded_batches = state["coded_tokens"], state["coded_batches"]


class StreamDecoder(StreamCallback):
    """Bob: decodes each first-pass batch of `stream` onto the tape, just before it is learned."""

    def __init__(self, tape: Tape, checksum_every: int, procedure: str = "full", *, stream: Stream):
        super().__init__(tape, checksum_every, procedure, stream)
        self._segment = -1  # index of the open segment
        self._segment_end = 0  # coded_batches when it ends

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not pl_module.is_first_pass(batch):
            return
        if self.coded_batches == self._segment_end:
            self._open_next_segment()
        pos, valid = self.tape.positions(batch["spans"])
        targets = torch.where(valid, 0, IGNORE)  # unknown yet: 0 stands in, never attended to
        self._code_before_step(trainer, pl_module, targets, batch)
        if self.world > 1:  # every process needs every row: the n-gram counts, replays, the output
            targets = self._gather_rows(pl_module, targets, batch["all_spans"])
            pos, valid = self.tape.positions(batch["all_spans"])
        self.tape.write(pos[valid], targets[valid])

    def _gather_rows(self, pl_module, rows: torch.Tensor, all_spans: torch.Tensor) -> torch.Tensor:
        """This process's decoded rows → the whole batch's: row j is process j % world's row j // world."""
        per, width = -(-len(all_spans) // self.world), max(1, int(all_spans[:, 1].max()))
        padded = torch.full((per, width), IGNORE)
        padded[: len(rows), : rows.shape[1]] = rows[:per]  # (a process without rows has one empty stand-in)
        gathered = pl_module.all_gather(padded.to(pl_module.device)).cpu()  # (world, per, width)
        return gathered.transpose(0, 1).reshape(per * self.world, width)[: len(all_spans)]

    def on_train_end(self, trainer, pl_module) -> None:
        self._close_segment()
        expected = sum(seg.batches for seg in self.stream.segments[self.rank :: self.world])
        if self.coded_batches != expected:
            raise StreamError(
                f"training ended after {self.coded_batches} batches; the stream has {expected}: "
                "it was cut short, or config and code differ"
            )
        super().on_train_end(trainer, pl_module)

    def _open_next_segment(self) -> None:
        self._close_segment()
        self._segment += 1
        index = self._segment * self.world + self.rank  # this process's sub-stream of the segment
        if index >= len(self.stream.segments):
            raise StreamError(f"stream ends after {self.coded_batches} batches but training continues: truncated?")
        segment = self.stream.segments[index]
        self.coder, self._segment_end = Decoder(segment.words, segment.lanes), self.coded_batches + segment.batches

    def _close_segment(self) -> None:
        if self.coder is not None and not self.coder.exhausted():
            raise StreamError(
                f"segment ending at batch {self.coded_batches} has words left over: stream does not match"
            )

    def _check(self, key: str, pl_module: L.LightningModule) -> None:
        super()._check(key, pl_module)
        here, expected = self.checksums[key], self.stream.trailer.get("checksums", {}).get(key)
        if expected is None:
            raise StreamError(f"stream has no checksum for batch {key}: written by other code, or truncated")
        if here["tokens"] != expected["tokens"]:
            raise StreamError(f"decoded tokens differ from the encoder's by batch {key}: decoding diverged")
        if here["params"] != expected["params"]:
            raise StreamError(
                f"parameters differ from the encoder's after batch {key} although the tokens match: training "
                "is not bitwise reproducible here (different hardware, thread count or library build?)"
            )

    def load_state_dict(self, state: dict) -> None:
        raise StreamError("the decoder replays from the start; it does not resume from checkpoints")
