"""Token tape → batches of spans, in an order both encoder and decoder can rebuild.

The DataLoader yields only *where* each batch lies in the corpus (spans of the tape), never
its content. The encoder's tape holds the real tokens; the decoder's starts empty and is
filled by arithmetic decoding just before each training step. Both then run the very same
`training_step`, which reads its inputs from the tape. Reading a corpus is Alice's
(prequel/alice/corpus.py).
"""

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from prequel.training.curriculum import plan_batches, with_replay
from prequel.training.tokens import TokenShards

IGNORE = -100  # target id of padding positions


class DataError(ValueError):
    """A corpus problem a person must fix; the message names the file and the problem."""


class Tape:
    """The corpus as one row of token ids (`TokenShards`: on disk, or a tensor held in memory),
    plus how many bytes each token id stands for."""

    def __init__(self, tokens, bos_id: int, nbytes_per_id: torch.Tensor | None = None, context: int = 0):
        self.tokens = tokens if isinstance(tokens, TokenShards) else TokenShards.in_memory(tokens)
        self.bos_id = bos_id
        self.nbytes_per_id = nbytes_per_id  # None: one byte per token
        self.context = context  # inputs read before each span (data.context)

    def __len__(self) -> int:
        return len(self.tokens)

    def positions(self, spans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token positions (B, L) of each span and the mask of those that exist."""
        spans = spans.cpu()
        offsets = torch.arange(max(1, int(spans[:, 1].max())))
        valid = offsets[None, :] < spans[:, 1:2]
        return (spans[:, :1] + offsets[None, :]).clamp(max=len(self) - 1), valid

    def batch(self, spans: torch.Tensor, known: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x = what comes before the span (`before`) + span[:-1], and targets y = span
        (IGNORE where the span ended)."""
        pos, valid = self.positions(spans)
        y = torch.where(valid, self.tokens[pos], IGNORE)
        return self.inputs(y, self.before(spans, known)), y

    def before(self, spans: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor | None:
        """The context + 1 tokens before each span, of which the last `known` (B,) were coded
        earlier (`context_known`), BOS for the rest; None without context (x then starts at BOS)."""
        if not self.context:
            return None
        known = torch.zeros(len(spans), dtype=torch.long) if known is None else known.cpu()
        offsets = torch.arange(-self.context - 1, 0)
        tokens = self.tokens[(spans[:, :1].cpu() + offsets).clamp(min=0)]
        return torch.where(offsets >= -known[:, None], tokens, self.bos_id)

    def inputs(self, y: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
        """x = `before` (or BOS) + y[:, :-1]: position t sees only targets before t."""
        first = torch.full_like(y[:, :1], self.bos_id) if before is None else before.to(y.device)
        return torch.cat([first, y[:, :-1].clamp(min=0)], dim=1)  # pad inputs are never attended to

    def write(self, pos: torch.Tensor, ids: torch.Tensor) -> None:
        """Bob: decoded ids onto their positions."""
        self.tokens[pos] = ids

    def decoded(self, tokenizer, spans: torch.Tensor | None = None):
        """The bytes of the whole tape (or of `spans`, in order), a piece at a time."""
        if spans is None:
            yield from map(tokenizer.decode, self.tokens.slices())
            return
        for start, length in spans.tolist():
            yield tokenizer.decode(self.tokens.slice(start, start + length))

    def nbytes(self, targets: torch.Tensor, mask: torch.Tensor | None = None) -> int:
        """The input bytes that a batch's targets (`batch`'s y, on the host) stand for; `mask`:
        targets != IGNORE, if the caller has it."""
        mask = targets != IGNORE if mask is None else mask
        return int(mask.sum()) if self.nbytes_per_id is None else int(self.nbytes_per_id[targets[mask]].sum())


def context_known(steps: list[tuple[torch.Tensor, bool]], n_tokens: int, context: int) -> list[torch.Tensor]:
    """Per step, per row: how many of the context + 1 tokens before its span were coded by an
    earlier step, so both sides have them (the last ones before the span, contiguous). A replayed
    span reads what its first pass read: the n-gram counts it is left out of were counted so."""
    coded = np.zeros(n_tokens, dtype=bool)
    first: dict[int, int] = {}  # span start -> known at its first pass
    known = []
    for spans, fresh in steps:
        rows = []
        for start, length in spans.tolist():  # noqa: B007
            if fresh:
                window = coded[max(0, start - context - 1) : start][::-1]
                first[start] = len(window) if window.all() else int(window.argmin())
            rows.append(first[start])
        known.append(torch.tensor(rows, dtype=torch.long))
        if fresh:
            for start, length in spans.tolist():
                coded[start : start + length] = True
    return known


class _Steps(Dataset):
    def __init__(
        self,
        steps: list[tuple[torch.Tensor, bool]],
        rank: int,
        world_size: int,
        known: list[torch.Tensor] | None = None,
    ):
        self.steps, self.rank, self.world_size, self.known = steps, rank, world_size, known

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> dict:
        spans, fresh = self.steps[i]
        rows = spans[self.rank :: self.world_size]  # this process's rows of global batch i
        # A short last batch may leave a process no row; it still steps (DDP syncs every
        # backward), on an empty span that contributes no token and no gradient. What is learnt
        # by counting (the n-gram counts) and the stream's checks see the whole batch: "all_spans".
        item = {"spans": rows if len(rows) else torch.zeros(1, 2, dtype=torch.long), "all_spans": spans, "fresh": fresh}
        if self.known is not None:  # data.context: how much of it each row has ("known", "all_known")
            known = self.known[i]
            rows = known[self.rank :: self.world_size]
            item |= {"known": rows if len(rows) else torch.zeros(1, dtype=torch.long), "all_known": known}
        return item


class _ResumableSampler(Sampler[int]):
    """Batches in plan order; after a mid-epoch resume the first pass skips what was trained."""

    def __init__(self, n: int, skip: int = 0):
        self.n, self.skip = n, skip

    def __len__(self) -> int:
        return self.n  # Lightning counts a resumed epoch from its restored progress up to this

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return iter(range(skip, self.n))


def plan_options(data) -> dict:
    """The `plan_batches` keywords that a `DataConfig` sets."""
    return {
        "pacing": data.pacing,
        "pacing_start": data.pacing_start,
        "warmup_tokens": data.warmup_tokens,
        "replay_steps": data.replay_steps,
        "replay_window": data.replay_window,
    }


class PrequelDataModule(L.LightningDataModule):
    """Yields {"spans": this process's rows (b, 2), "all_spans": (B, 2), "fresh": bool} (with
    data.context also "known" (b,) and "all_known" (B,): see `context_known`): fresh
    batches are the first pass (coded), the others replay already-coded chunks (see
    `curriculum.with_replay`)."""

    def __init__(
        self,
        tape: Tape,
        seq_len: int,
        batch_size: int,
        curriculum: str,
        seed: int,
        replay_steps: int = 0,
        replay_window: int = 0,
        **plan_options,
    ):
        super().__init__()
        self.tape = tape
        self.batches = plan_batches(len(tape), seq_len, batch_size, curriculum, seed, **plan_options)
        self.steps = with_replay(self.batches, replay_steps, replay_window, seed)
        self.known = context_known(self.steps, len(tape), tape.context) if tape.context else None
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done)

    def train_dataloader(self) -> DataLoader:
        skip = 0
        if self._resume_at is not None and self._resume_at[0] == self.trainer.current_epoch:
            skip = self._resume_at[1]
        rank, world = self.trainer.global_rank, self.trainer.world_size
        sampler = _ResumableSampler(len(self.steps), skip)
        # batch_size=None: each item is already a batch; workers would prefetch past the
        # decoder, which must fill the tape first, so data loading stays in-process.
        return DataLoader(_Steps(self.steps, rank, world, self.known), batch_size=None, sampler=sampler)

    def transfer_batch_to_device(self, batch: dict, device, dataloader_idx: int) -> dict:
        """A batch stays on the host: it is the plan (spans on the tape), which the host reads, and
        the module's step copies the tokens it names. On a GPU, Lightning's copy of it would make
        every read of the spans wait for the device."""
        return batch

    def state_dict(self) -> dict:
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = (state["epoch"], state["batches_done"])
