"""What a LightningModule exposes for prequel's callbacks: a stated contract, checked at `setup`.

`CodeLength` works with any causal language model. In `training_step`, before Lightning's optimizer
step learns the batch, the module stores what it predicted in ``self.coded``: per-token NLL of the
batch's targets under the weights from *before* that step (the prequential probability), which
tokens are real, and how many input bytes they stand for. A `CodedTokens` holds exactly that;
prequel's own `CodedBatch` (training/module.py) holds it and more. The module sets ``self.coded =
None`` in ``__init__``, so a missing attribute is caught before training starts, not at step 1::

    def training_step(self, batch, batch_idx):
        x, y = batch
        nll = F.cross_entropy(self(x).flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        self.coded = CodedTokens(nll.detach(), mask=torch.ones_like(y, dtype=torch.bool), nbytes=y.numel(),
                                 first_pass=self.current_epoch == 0)
        return nll.mean()

Only first-pass tokens count (``first_pass``: the data's first visit; ``fresh`` False marks a
replay of data already coded). examples/own_lm.py is a runnable module of this kind.

The stream (`StreamEncoder`, `StreamDecoder`) needs more, because Bob must rebuild the run exactly:
the data plan's batches of spans on a `Tape` (prequel.training.data), the coded batch's targets and
their coding intervals, and a forward that gives the logits of the coded positions (`StreamModule`).
`PrequelModule` is the implementation; a stream from another module would also need that module's
code in f, which prequel does not count, so the stream callbacks refuse other modules by name.

`require` is the one check: it names every missing attribute in one error. It decides whether a
run starts and changes no bit, so this module is not part of f (prequel/program.py).
"""

from dataclasses import dataclass
from typing import Any, Protocol

import torch


class ContractError(TypeError):
    """A LightningModule lacks what a prequel callback needs; the message names it."""


class Coded(Protocol):
    """What `CodeLength` reads from ``pl_module.coded`` after each training step."""

    nll: torch.Tensor  # (B, L) float: -ln P(target) under the pre-step weights, nats; 0 where no token
    mask: torch.Tensor  # (B, L) bool: True where there is a token
    nbytes: int  # the input bytes the batch's tokens stand for (bits per byte divides by these)
    fresh: bool  # False for a replay of data already coded: not counted at all
    first_pass: bool  # True for the data's first visit (epoch 0): only these tokens are code length


class CodeLengthModule(Protocol):
    """A LightningModule that `CodeLength` can measure."""

    coded: Coded | None  # set by training_step, before the optimizer step; None before the first step


class StreamCoded(Coded, Protocol):
    """What the stream callbacks read from ``pl_module.coded`` besides `Coded`."""

    targets: torch.Tensor  # (B, L) the batch's tokens, -100 where there is none
    intervals: torch.Tensor | None  # (B, L, 2) each target's coding interval (training/coding.py), or None


class StreamModule(CodeLengthModule, Protocol):
    """A LightningModule whose run can be written as a stream and decoded by replay."""

    coded: StreamCoded | None
    tape: Any  # prequel.training.data.Tape: the tokens, where the decoder writes what it decodes
    is_mixture: bool  # several models coding with one mixture (models/mixture.py)
    model: torch.nn.Module  # the GPT (or mixture) that KV-cache steps run on

    def is_first_pass(self, batch: dict) -> bool:
        """Is this batch coded (the data's first visit)? Asked before the step, to decode it."""
        ...


@dataclass
class CodedTokens:
    """The smallest `Coded`: what a module of one's own stores for `CodeLength`."""

    nll: torch.Tensor
    mask: torch.Tensor
    nbytes: int
    fresh: bool = True
    first_pass: bool = True


def members(protocol: type) -> list[str]:
    """The attributes and methods a protocol names, its bases' included, in definition order."""
    names: list[str] = []
    for cls in reversed(protocol.__mro__):
        if cls is object or cls is Protocol or not getattr(cls, "_is_protocol", False):
            continue
        for name in [*getattr(cls, "__annotations__", {}), *(k for k, v in vars(cls).items() if callable(v))]:
            if not name.startswith("_") and name not in names:
                names.append(name)
    return names


def require(obj: Any, protocol: type, who: str, what: str | None = None) -> None:
    """Raise one `ContractError` naming every member of `protocol` that `obj` lacks."""
    missing = [name for name in members(protocol) if not hasattr(obj, name)]
    if missing:
        what = what or type(obj).__name__
        raise ContractError(
            f"{who} needs {what} to have {', '.join(missing)} "
            f"(prequel.callbacks.contract.{protocol.__name__}: {protocol.__doc__.strip()})"
        )


def require_coded(pl_module: Any, protocol: type, who: str) -> Any:
    """``pl_module.coded`` after a training step, checked once against `protocol`."""
    coded = getattr(pl_module, "coded", None)
    name = f"{type(pl_module).__name__}.coded"
    if coded is None:
        raise ContractError(
            f"{who}: training_step left {name} None: set it to the batch's per-token NLL under "
            "the pre-step weights (prequel.callbacks.contract.CodedTokens)"
        )
    require(coded, protocol, who, name)
    return coded
