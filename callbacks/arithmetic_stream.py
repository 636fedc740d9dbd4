"""Alice and Bob as one callback: encode the first pass into a stream, or decode it back.

Encode: after each first-pass batch, code its targets with the probabilities of the training
forward that just ran (weights from before the step). Decode: before each first-pass batch,
fill the tape by decoding with the current weights; the same `training_step` then learns it.
Both sides call `coding.code_batch`, and both record the same checks (a hash chain of the
tokens coded so far and a hash of the parameters every `checksum_every` batches), so the
decoder names the first batch where anything drifted instead of producing garbage.

Every checkpoint seals the current range-coder segment and stores the sealed segments in the
checkpoint, so a run resumed from it continues the stream bit for bit where it left off.
"""

import hashlib

import lightning as L
import numpy as np
import torch

from models.gpt import KVCache
from training.coding import Decoder, Encoder, code_batch
from training.data import IGNORE, Tape
from training.stream import Segment, Stream, StreamError, write_stream


def parameters_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ArithmeticStream(L.Callback):
    def __init__(self, tape: Tape, checksum_every: int, procedure: str = "full", *, header: dict | None = None,
                 stream: Stream | None = None):
        if (header is None) == (stream is None):
            raise ValueError("give a header (to encode) or a stream (to decode)")
        self.tape = tape
        self.checksum_every = checksum_every
        self.procedure = procedure
        self.decoding = stream is not None
        self.stream = stream or Stream(header, [], {})
        self.tokens_hash = hashlib.sha256().hexdigest()  # chained per batch, so it can be checkpointed
        self.coded_tokens = 0
        self.coded_batches = 0
        self.checksums: dict[str, dict] = {}
        self._segment_start = 0  # coded_batches when the open segment began
        self._segment = -1  # decoder: index of the open segment
        self.coder = None if self.decoding else Encoder()
        self._segment_end = 0

    # --- before the step: Bob always; Alice too when coding incrementally ----------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch > 0 or not batch["fresh"]:
            return
        if self.decoding:
            self._open_decoder_segment()
        elif self.procedure != "incremental":
            return  # Alice codes after the step, with the training forward's logits
        pos, valid = self.tape.positions(batch["spans"])
        # Alice's targets are the data; Bob's start unknown (0: never attended to) and fill in.
        targets = torch.where(valid, 0, IGNORE) if self.decoding else self.tape.batch(batch["spans"])[1]
        with torch.no_grad(), trainer.precision_plugin.train_step_context():
            try:
                code_batch(self._logits_at(pl_module, targets), targets, self.coder)
            except StreamError as e:
                raise StreamError(f"batch {self.coded_batches + 1}: {e}") from None
        if self.decoding:
            self.tape.tokens[pos[valid]] = targets[valid]

    def _logits_at(self, pl_module, targets: torch.Tensor):
        """Column t's logits from what is known before column t, by the configured procedure.

        ``full``: the model on the whole (B, L) batch, positions >= t holding anything (causal
        attention ignores them), bitwise equal to the training forward: L forwards per batch
        for Bob, none extra for Alice. ``incremental``: a KV-cache step per column, the same
        steps on both sides: about one forward per batch for each (but not the training
        forward's bits, so Alice runs it too)."""
        device = pl_module.device
        if self.procedure == "full":
            return lambda t: pl_module(self.tape.inputs(targets).to(device))[:, t]
        cache = KVCache(pl_module.model.config, len(targets), device=device)

        bos = torch.full((len(targets),), self.tape.bos_id)

        def step(t: int) -> torch.Tensor:
            while True:  # columns without tokens (at the end) are skipped by code_batch
                x = targets[:, cache.pos - 1].clamp(min=0) if cache.pos else bos  # as Tape.inputs
                logits = pl_module.model.forward_step(x.to(device), cache)
                if cache.pos > t:
                    return logits
        return step

    def _open_decoder_segment(self) -> None:
        if self.coded_batches != self._segment_end:
            return
        self._close_decoder_segment()
        self._segment += 1
        if self._segment >= len(self.stream.segments):
            raise StreamError(f"stream ends after {self.coded_batches} batches but training continues: truncated?")
        segment = self.stream.segments[self._segment]
        self.coder, self._segment_end = Decoder(segment.words), self.coded_batches + segment.batches

    def _close_decoder_segment(self) -> None:
        if self.coder is not None and not self.coder.exhausted():
            raise StreamError(f"segment ending at batch {self.coded_batches} has words left over: stream does not match")

    # --- both --------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        coded = pl_module.coded
        if trainer.current_epoch > 0 or not coded.fresh:
            return
        targets = coded.targets.cpu()
        if not self.decoding and self.procedure == "full":
            code_batch(coded.logits, targets, self.coder)
        symbols = targets[targets != IGNORE]
        self.tokens_hash = hashlib.sha256(bytes.fromhex(self.tokens_hash) + symbols.to(torch.int32).numpy().tobytes()).hexdigest()
        self.coded_tokens += len(symbols)
        self.coded_batches += 1
        if self.coded_batches % self.checksum_every == 0:
            self._check(str(self.coded_batches), pl_module)

    def _check(self, key: str, pl_module: L.LightningModule) -> None:
        here = {"tokens": self.tokens_hash, "params": parameters_sha256(pl_module)}
        if not self.decoding:
            self.checksums[key] = here
            return
        expected = self.stream.trailer.get("checksums", {}).get(key)
        if expected is None:
            raise StreamError(f"stream has no checksum for batch {key}: written by other code, or truncated")
        if here["tokens"] != expected["tokens"]:
            raise StreamError(f"decoded tokens differ from the encoder's by batch {key}: decoding diverged")
        if here["params"] != expected["params"]:
            raise StreamError(
                f"parameters differ from the encoder's after batch {key} although the tokens match: training "
                "is not bitwise reproducible here (different hardware, thread count or library build?)"
            )

    def on_train_end(self, trainer, pl_module) -> None:
        if self.decoding:
            self._close_decoder_segment()
            expected = sum(seg.batches for seg in self.stream.segments)
            if self.coded_batches != expected:
                raise StreamError(f"training ended after {self.coded_batches} batches; the stream has {expected}: "
                                  "it was cut short, or config and code differ")
        else:
            self._seal()
        self._check("final", pl_module)
        self.stream.trailer.update(coded_tokens=self.coded_tokens, coded_batches=self.coded_batches, checksums=self.checksums)

    def _seal(self) -> None:
        if self.coded_batches > self._segment_start:
            self.stream.segments.append(Segment(self.coded_batches - self._segment_start, self.coder.words()))
            self._segment_start = self.coded_batches
            self.coder = Encoder()

    def save(self, path, trailer_extra: dict) -> int:
        """Write the finished stream (encoder); returns its size in bytes."""
        self.stream.trailer.update(trailer_extra)
        return write_stream(path, self.stream)

    # --- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if not self.decoding:
            self._seal()  # the checkpoint holds a stream that decodes up to exactly this batch
        return {
            "segments": [(s.batches, torch.from_numpy(s.words.astype(np.int64))) for s in self.stream.segments],
            "tokens_hash": self.tokens_hash, "coded_tokens": self.coded_tokens,
            "coded_batches": self.coded_batches, "checksums": self.checksums,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.decoding:
            raise StreamError("the decoder replays from the start; it does not resume from checkpoints")
        self.stream.segments = [Segment(b, w.numpy().astype(np.uint32)) for b, w in state["segments"]]
        self.tokens_hash, self.checksums = state["tokens_hash"], dict(state["checksums"])
        self.coded_tokens, self.coded_batches = state["coded_tokens"], state["coded_batches"]
        self._segment_start = self.coded_batches
        self.coder = Encoder()
