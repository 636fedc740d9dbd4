"""The LightningModule: one prequential training step.

Lightning runs backward and the optimizer step *after* `training_step` returns, so the
per-token NLL computed here is under the weights from before this batch was learned: exactly
the probability Alice codes the batch with. It is kept (detached) in `self.coded` for the
code-length and stream callbacks, which must not use the loss Lightning hands to hooks (that
one is scaled by gradient accumulation). Whether a batch is coded at all is decided in one
place, `is_first_pass`, and carried in `coded.first_pass`.
"""

import math
from dataclasses import asdict, dataclass, replace

import lightning as L
import torch
import torch.nn.functional as F

from prequel.models import portable_math
from prequel.models.gpt import GPT
from prequel.training.coding import target_intervals
from prequel.training.config import Config, mixture_members, program_dict
from prequel.training.data import IGNORE, Tape
from prequel.training.loss import HeadNLL, SoftmaxNLL


@dataclass
class CodedBatch:
    """What the model predicted for one batch, before learning it."""

    spans: torch.Tensor  # (B, 2) start, length on the tape
    fresh: bool  # a pass over the data, not a replay of coded data
    first_pass: bool  # coded: fresh, in epoch 0 (see PrequelModule.is_first_pass)
    intervals: torch.Tensor | None  # (B, L, 2) int64 (start, frequency) of each target, for the stream
    targets: torch.Tensor  # (B, L), IGNORE where there is no token
    mask: torch.Tensor  # (B, L) targets != IGNORE
    nll: torch.Tensor  # (B, L) nats, float32, 0 where IGNORE
    nbytes: int  # input bytes the batch's tokens stand for
    log_w: torch.Tensor | None = None  # a mixture's log weights after this batch (models/mixture.py)
    member_nll: torch.Tensor | None = None  # a mixture's (B, L, K) per-member NLL, nats


def writes_logs(trainer: L.Trainer) -> bool:
    """Does Lightning write logs after this batch: a log step's (its last batch, when gradients
    accumulate)? What its own LearningRateMonitor and ThroughputMonitor ask. A value logged on
    another batch would be written at the next log step, stale."""
    return trainer._logger_connector.should_update_logs and not trainer.fit_loop._should_accumulate()


class PrequelModule(L.LightningModule):
    def __init__(self, config: Config, vocab_size: int):
        super().__init__()
        self.config = config
        members = mixture_members(config)
        self.is_mixture = bool(members)
        if members:  # every member initialised as it would be alone (same seed), so it trains as alone
            from prequel.models.mixture import Mixture  # (only a mixture run needs it in f: prequel/program.py)

            self.model = Mixture(
                [replace(m, vocab_size=vocab_size) for m, _ in members],
                config.mixture.weights,
                config.mixture.switch_rate,
                seed=config.seed,
            )
        else:
            self.model = GPT(replace(config.model, vocab_size=vocab_size))
        self.member_lrs = [lr for _, lr in members]
        self.tape: Tape | None = None  # attached by the DataModule's owner (see attach)
        self.coded: CodedBatch | None = None
        self.code_intervals = False  # the stream encoder sets it: keep each target's coding interval
        # The GPT and run settings travel in every checkpoint, so a checkpoint alone rebuilds its model
        # (prequel compress/decompress); plain data, loadable with torch.load(weights_only=True).
        self.save_hyperparameters(
            {"vocab_size": vocab_size, "model": asdict(self.model.config), "config": program_dict(config)}
        )

    def attach(self, tape: Tape) -> None:
        self.tape = tape

    def forward(self, idx: torch.Tensor, leave_out: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Logits of the coded positions: the last idx.shape[1] - data.context (the context before
        them is only read). `leave_out`: their targets, when the n-gram prior has counted them."""
        context = self.config.data.context
        if self.config.model.head_chunk:  # (one GPT, no n-gram prior)
            return self.model(idx, first=context)
        if context and leave_out is not None:
            leave_out = F.pad(leave_out, (context, 0), value=IGNORE)
        return self.model(idx, leave_out, **kwargs)[:, context:]

    def is_first_pass(self, batch: dict) -> bool:
        """Is this batch coded? Only the data's first visit is: a replay, or any batch of a later
        epoch, is data the receiver already has. The stream decoder asks before the step (to
        decode the batch); every hook after it reads `coded.first_pass`."""
        return batch["fresh"] and self.current_epoch == 0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        spans = batch["spans"]
        x, y = self.tape.batch(spans, batch.get("known"))
        mask = y != IGNORE
        nbytes = self.tape.nbytes(y, mask)  # (the host's copies: no device read)
        x, y, mask = self._to_device(x), self._to_device(y), self._to_device(mask)
        first_pass = self.is_first_pass(batch)
        tokens = mask.sum()
        log_w = member_nll = intervals = None
        if self.config.model.head_chunk:  # never the whole batch's logits (training/loss.py)
            nll, intervals = self._chunked_nll(x, y, first_pass and self.code_intervals)
            loss = nll.sum() / tokens.clamp(min=1)
            return self._finish(batch, x, y, mask, nll, loss, tokens, nbytes, intervals)
        mixture = {"logits": True} if self.is_mixture else {}
        logits = self(x, None if first_pass else y, **mixture)  # replayed tokens are in the n-gram counts already
        if self.is_mixture:  # logits: the members' (B, L, K, V); each learns from its own loss, as alone
            member_nll = torch.stack(
                [
                    SoftmaxNLL.apply(logits[:, :, k].flatten(0, 1), y.flatten(), mask.flatten())[0]
                    for k in range(logits.shape[2])
                ],
                -1,
            ).view(*y.shape, -1)
            loss = (member_nll.sum((0, 1)) / tokens.clamp(min=1)).sum()
            member_lp = torch.log_softmax(logits.detach(), -1)  # what Bob's forward gives him
            logits, log_w = self.model.mix_batch(member_lp, y, mask)  # the code: the mixture
            member_nll = member_nll.detach()
        # One softmax: the loss and the code.
        nll, probs = SoftmaxNLL.apply(logits.float().flatten(0, 1), y.flatten(), mask.flatten())
        nll = nll.view_as(y)
        if member_nll is None:
            loss = nll.sum() / tokens.clamp(min=1)
        if first_pass and self.code_intervals:
            intervals = self._intervals(probs, y)
        if self.config.model.z_loss:
            z = portable_math.logsumexp(logits.float(), dim=-1)[mask]
            z_loss = self.config.model.z_loss * (z * z).mean()  # not z**2: pow may be MKL's (portable_math)
        else:
            z_loss = None
        return self._finish(batch, x, y, mask, nll, loss, tokens, nbytes, intervals, log_w, member_nll, z_loss)

    def _finish(
        self, batch, x, y, mask, nll, loss, tokens, nbytes, intervals, log_w=None, member_nll=None, z_loss=None
    ):
        """Keep what the step predicted (`coded`), log at intervals, count what learns by counting."""
        spans, first_pass = batch["spans"], self.is_first_pass(batch)
        self.coded = CodedBatch(
            spans, batch["fresh"], first_pass, intervals, y, mask, nll.detach(), nbytes, log_w, member_nll
        )
        if writes_logs(self.trainer):  # (self.log costs ~0.3 ms a call, and reads the device)
            bits = nll.detach().sum() / math.log(2)
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=int(tokens))
            self.log("train/bpb", bits / max(self.coded.nbytes, 1), prog_bar=True, batch_size=int(tokens))
        if z_loss is not None:
            loss = loss + z_loss
        if first_pass:  # every process counts the whole batch (its rows and the others', on the tape by now)
            self._count_coded(
                *(t.to(self.device) for t in self.tape.batch(batch["all_spans"], batch.get("all_known")))
                if self.trainer.world_size > 1
                else (x, y)
            )
        return loss

    def _chunked_nll(self, x: torch.Tensor, y: torch.Tensor, intervals: bool):
        """NLL (B, L) and, if asked, the targets' intervals (B, L, 2), `head_chunk` rows of logits at a time."""
        h = self.model.features(x, self.config.data.context).flatten(0, 1)
        nll, spans = HeadNLL.apply(h, self.model.output_weight, y.flatten(), self.config.model.head_chunk, intervals)
        return nll.view_as(y), spans.view(*y.shape, 2) if intervals else None

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor to the module's device without the host waiting (pinned memory, then a
        non-blocking copy: a plain `.to` would wait for the device's queue to empty each step)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    @torch.no_grad()
    def _intervals(self, probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The intervals Alice codes the targets with (training/coding.py), while the step's softmax
        exists: so nothing (B, L, V) outlives the step."""
        return target_intervals(probs, y.flatten()).view(*y.shape, 2)

    def _count_coded(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """What learns from coded tokens by counting, not by gradient: the n-gram counts and a
        mixture's weights. Here, after the forward that coded the batch (the decoder has just
        decoded it, so counts the same) and before any callback's batch-end hook, so that a
        checkpoint saved after this step holds them (a resumed run must not miss a batch)."""
        if self.is_mixture:  # the weights move with the coded tokens only
            self.model.observe(self.coded.log_w, self.coded.member_nll)
        if self.model.ngram is not None:  # (the context's targets were counted when they were coded)
            self.model.ngram.update(x, F.pad(y, (self.config.data.context, 0), value=IGNORE), IGNORE)

    def configure_optimizers(self):
        o = self.config.optim
        groups = []  # per member of a mixture, with its own learning rate
        for model, lr in zip(self.model.members, self.member_lrs) if self.member_lrs else [(self.model, o.lr)]:
            groups += [
                {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": o.weight_decay, "lr": lr},
                {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0, "lr": lr},
            ]
        optimizer = torch.optim.AdamW(
            groups,
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            fused=True,  # one ATen kernel, same bits on every CPU; the loop version's sqrt is MKL VML's (portable_math)
        )
        total = max(1, self.trainer.estimated_stepping_batches) if o.schedule == "cosine" else 0

        def factor(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / (o.warmup_steps + 1)
            if o.schedule == "cosine":
                progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
                return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """A mixture's members are clipped each by its own norm (as each would be alone)."""
        if not self.member_lrs or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        for group in range(0, len(optimizer.param_groups), 2):  # a member's decay and no-decay groups
            params = optimizer.param_groups[group]["params"] + optimizer.param_groups[group + 1]["params"]
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
