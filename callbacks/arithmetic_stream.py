"""Alice and Bob as one callback: encode the first pass into a stream, or decode it back.

Encode: after each first-pass batch, code its targets with the probabilities of the training
forward that just ran (weights from before the step). Decode: before each first-pass batch,
fill the tape by decoding with the current weights; the same `training_step` then learns it.
Both sides call `coding.code_batch`, and both record the same checkpoints (a hash of the
tokens coded so far and of the parameters every `checksum_every` batches), so the decoder
names the first batch where anything drifted instead of producing garbage.
"""

import hashlib

import lightning as L
import torch

from training.coding import Decoder, Encoder, code_batch
from training.data import IGNORE, Tape
from training.stream import Stream, StreamError, write_stream


def parameters_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ArithmeticStream(L.Callback):
    def __init__(self, tape: Tape, checksum_every: int, *, header: dict | None = None, stream: Stream | None = None):
        if (header is None) == (stream is None):
            raise ValueError("give a header (to encode) or a stream (to decode)")
        self.tape = tape
        self.checksum_every = checksum_every
        self.header = header if stream is None else stream.header
        self.decoding = stream is not None
        self.stream = stream
        self.coder = Decoder(stream.words) if self.decoding else Encoder()
        self.tokens_hash = hashlib.sha256()
        self.coded_tokens = 0
        self.coded_batches = 0
        self.checksums: dict[str, dict] = {}  # by batch number; the encoder's, in a decoded stream

    def on_train_batch_start(self, trainer, pl_module, spans, batch_idx) -> None:
        if not self.decoding or trainer.current_epoch > 0:
            return
        pos, valid = self.tape.positions(spans)
        targets = torch.where(valid, 0, IGNORE)  # 0 = not decoded yet; never attended to

        def logits_at(t: int) -> torch.Tensor:
            x = self.tape.inputs(targets).to(pl_module.device)
            with torch.no_grad(), trainer.precision_plugin.train_step_context():
                return pl_module(x)[:, t]

        code_batch(logits_at, targets, self.coder)
        self.tape.tokens[pos[valid]] = targets[valid]

    def on_train_batch_end(self, trainer, pl_module, outputs, spans, batch_idx) -> None:
        if trainer.current_epoch > 0:
            return
        coded = pl_module.coded
        targets = coded.targets.cpu()
        if not self.decoding:
            code_batch(lambda t: coded.logits[:, t], targets, self.coder)
        symbols = targets[targets != IGNORE]
        self.tokens_hash.update(symbols.to(torch.int32).numpy().tobytes())
        self.coded_tokens += len(symbols)
        self.coded_batches += 1
        if self.coded_batches % self.checksum_every == 0:
            self._checkpoint(str(self.coded_batches), pl_module)

    def _checkpoint(self, key: str, pl_module: L.LightningModule) -> None:
        here = {"tokens": self.tokens_hash.hexdigest(), "params": parameters_sha256(pl_module)}
        if not self.decoding:
            self.checksums[key] = here
            return
        expected = self.stream.trailer["checksums"].get(key)
        if expected is None:
            raise StreamError(f"stream has no checksum for batch {key}: it was written by other code or truncated")
        if here["tokens"] != expected["tokens"]:
            raise StreamError(f"decoded tokens differ from the encoder's by batch {key}: decoding diverged")
        if here["params"] != expected["params"]:
            raise StreamError(
                f"parameters differ from the encoder's after batch {key} although the tokens match: "
                "training is not bitwise reproducible here (different hardware, threads or library build?)"
            )

    def on_train_end(self, trainer, pl_module) -> None:
        self._checkpoint("final", pl_module)
        if self.decoding:
            if not self.coder.exhausted():
                raise StreamError("decoding finished but stream words remain: the stream does not match this training")
            return
        self.stream = Stream(self.header, self.coder.words(), {
            "coded_tokens": self.coded_tokens,
            "coded_batches": self.coded_batches,
            "checksums": self.checksums,
        })

    def save(self, path, trailer_extra: dict) -> int:
        """Write the finished stream (encoder); returns its size in bytes."""
        self.stream.trailer.update(trailer_extra)
        return write_stream(path, self.stream)
