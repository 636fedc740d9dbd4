"""The headline number: the prequential code length of the data.

For every token seen for the first time, add −log₂ P(token | context) under the weights from
*before* the step that learns it (the module's `coded` batch). The sum is the area under the
first-pass per-token loss curve in bits, Σ. With the program f and the per-symbol rounding
bound n of arithmetic coding:

    code length S = |f| + n + Σ  bits,   bits per byte = S / input bytes.

Only epoch 0 is a first pass: every plan visits each token exactly once per epoch, so later
epochs' loss is reported as `train/last_epoch_bpb` and never called code length.

Any causal LM module can be measured: what it must expose is stated and checked in
callbacks/contract.py (`CodeLengthModule`); examples/own_lm.py is one that is not prequel's GPT.
"""

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torchmetrics import Metric

from prequel.callbacks.contract import Coded, CodeLengthModule, require, require_coded
from prequel.training.module import writes_logs

_MAX_PENDING = 1024  # steps held on the device at most before they are read back (log_every_n_steps may be large)


class BitsMetric(Metric):
    """Σ bits, tokens and bytes; float64 sums, summed across processes."""

    full_state_update = False

    def __init__(self):
        super().__init__(sync_on_compute=True)
        for name in ("bits", "tokens", "nbytes"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, bits: Sequence[float], tokens: Sequence[int], nbytes: Sequence[int]) -> None:
        """Add some steps' sums, read back to the host, in step order: the same float64 additions, one
        by one, that adding each step's tensor on the device would make (so the same Σ, bit for bit)."""
        for state, values in ((self.bits, bits), (self.tokens, tokens), (self.nbytes, nbytes)):
            total = state.item()
            for value in values:
                total += value
            state.fill_(total)

    def compute(self) -> dict[str, float]:
        return {"bits": self.bits.item(), "tokens": self.tokens.item(), "nbytes": self.nbytes.item()}


class CodeLength(L.Callback):
    def __init__(self, f_parts: dict[str, int], total_tokens: int):
        self.f_parts = f_parts  # |f| by part
        self.total_tokens = total_tokens  # tokens in one full pass
        self.first_pass = BitsMetric()
        self.last_epoch = BitsMetric()
        self._curve: list[tuple[int, float, int]] = []  # (tokens seen, bits of step, tokens of step)
        # Steps not yet read back (nats and tokens on the device, bytes, first pass): the sums and the
        # curve take them at log intervals, so no step waits for the device or pays a metric update.
        self._pending: list[tuple[torch.Tensor, torch.Tensor, int, bool]] = []

    @property
    def f_bits(self) -> int:
        return sum(self.f_parts.values())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require(pl_module, CodeLengthModule, "CodeLength")
        self._coded_checked = False
        self.first_pass.to(pl_module.device)
        self.last_epoch.to(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read_back()  # the previous epoch's last steps, into its sums
        if trainer.current_epoch != self._restored_epoch:  # a resumed epoch keeps its sums
            self.last_epoch.reset()
        self._restored_epoch = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._coded_checked:  # once: what training_step stored has the fields Σ needs
            require_coded(pl_module, Coded, "CodeLength")
            self._coded_checked = True
        coded = pl_module.coded
        if not coded.fresh:  # a replay step: data already counted
            return
        nats = coded.nll.double().sum()  # the NLL is 0 where there is no token
        self._pending.append((nats, coded.mask.sum(), coded.nbytes, coded.first_pass))
        log = writes_logs(trainer)
        if not log and len(self._pending) < _MAX_PENDING:
            return
        self._read_back()
        if not (log and coded.first_pass):  # (a later epoch's steps leave the code length as it is)
            return
        # Running values are this process's (no sync across processes); the final report syncs. Straight
        # to the loggers, at the step Lightning logs this batch's values at (as its LearningRateMonitor
        # does): `pl_module.log` would cost a few hundred µs a key for results nothing else reads.
        data_bits, nbytes = self.first_pass.bits.item(), self.first_pass.nbytes.item()
        total = self.f_bits + self._curve[-1][0] + data_bits
        values = {
            "code/data_bits": data_bits,
            "code/total_bits": total,
            "code/bpb": total / max(nbytes, 1),
            "code/data_bpb": data_bits / max(nbytes, 1),
        }
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.fit_loop.epoch_loop._batches_that_stepped)

    @property
    def curve(self) -> list[tuple[int, float, int]]:
        """(tokens seen, bits, tokens) of every first-pass step so far."""
        self._read_back()
        return self._curve

    def _read_back(self) -> None:
        """The pending steps to the host (one transfer, a sync on a GPU, for all of them), into the
        sums (a later epoch's into `last_epoch` only: it is never code length) and the curve."""
        if not self._pending:
            return
        bits = [nats / math.log(2) for nats in torch.stack([b for b, _, _, _ in self._pending]).tolist()]
        tokens = torch.stack([n for _, n, _, _ in self._pending]).tolist()
        nbytes = [m for _, _, m, _ in self._pending]
        first = [f for _, _, _, f in self._pending]
        self._pending = []
        self.last_epoch.update(bits, tokens, nbytes)
        if not any(first):
            return
        coded = [i for i, f in enumerate(first) if f]
        self.first_pass.update(*([v[i] for i in coded] for v in (bits, tokens, nbytes)))
        seen = self._curve[-1][0] if self._curve else 0
        for i in coded:
            seen += tokens[i]
            self._curve.append((seen, bits[i], tokens[i]))

    def totals(self) -> dict[str, Any]:
        """The synced first-pass sums, |f| parts and the last epoch's cross-entropy."""
        self._read_back()
        first, last = self.first_pass.compute(), self.last_epoch.compute()
        return {
            "data_bits": first["bits"],
            "tokens": int(first["tokens"]),
            "nbytes": int(first["nbytes"]),
            "complete": int(first["tokens"]) == self.total_tokens,
            "f_parts": dict(self.f_parts),
            "last_epoch_bpb": last["bits"] / max(last["nbytes"], 1),
        }

    # Resume: the sums continue exactly where the checkpoint left them.
    _restored_epoch: int | None = None
    _coded_checked = False

    def state_dict(self) -> dict[str, Any]:
        self._read_back()
        return {  # global sums (compute() syncs across processes)
            "first_pass": self.first_pass.compute(),
            "last_epoch": self.last_epoch.compute(),
            "curve": list(self.curve),
            "epoch": self._epoch,
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._epoch = trainer.current_epoch

    _epoch = 0

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Global sums go to rank 0 only (see on_train_start), so a synced compute() counts them once.
        self._loaded = state

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state, self._loaded = getattr(self, "_loaded", None), None
        if state is None:
            return
        for metric, key in ((self.first_pass, "first_pass"), (self.last_epoch, "last_epoch")):
            metric.reset()
            if trainer.global_rank == 0:
                for name in ("bits", "tokens", "nbytes"):
                    setattr(metric, name, getattr(metric, name) + state[key][name])
        self._curve, self._pending = [tuple(c) for c in state["curve"]], []
        self._restored_epoch = state["epoch"]
