"""Count-based n-gram priors the GPT adds to its logits, for fast learning from the start.

A transformer trained from scratch spends its first few hundred kilobytes near the unigram
rate, and in prequential coding that slow start is most of the code length. Context counts
learn from a single occurrence: on tinyshakespeare an adaptive order-2 byte model alone codes
at 2.93 bpb, better than the small GPT's whole first pass. `NGramPrior` keeps, for contexts of
the last 1..K input tokens, how often each token followed, and hands the GPT the smoothed
log-probabilities; the GPT mixes them into its logits with weights it computes from its hidden
state (a product of experts, as PAQ's logistic mixing combines models in the log domain), so it
can lean on them early and on itself later.

The counts change only from data both sides have: after each first-pass batch has been coded
(`update`), never inside a forward. They are a deterministic function of the coded data, the
same for encoder and decoder, and saved in checkpoints with the weights, sparsely: the dense
order-1..6 tables are 165 MB of mostly zeros, their nonzero entries a few MB.
"""

import torch
import torch.nn as nn

from prequel.models import portable_math

_MULT = 1597334677  # an odd 31-bit multiplier: hashes stay below 2**62, no int64 overflow


class NGramPrior(nn.Module):
    def __init__(self, vocab_size: int, max_order: int, hash_bits: int, alpha: float = 0.05):
        super().__init__()
        self.vocab_size, self.max_order, self.hash_bits = vocab_size, max_order, hash_bits
        self.alpha = alpha  # additive smoothing; small, since most contexts are sparse
        for k in range(1, max_order + 1):
            rows = vocab_size + 1 if k == 1 else 1 << hash_bits  # order 1: exact (+ BOS)
            # not persistent: the state dict holds them sparsely (see _save_to_state_dict)
            self.register_buffer(f"counts{k}", torch.zeros(rows, vocab_size), persistent=False)

    def _tables(self) -> list[tuple[str, torch.Tensor]]:
        return [(f"counts{k}", getattr(self, f"counts{k}")) for k in range(1, self.max_order + 1)]

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for name, counts in self._tables():
            flat = counts.flatten()
            index = flat.nonzero()[:, 0]  # ascending: the same tensors for the same counts
            destination[f"{prefix}{name}_index"] = index.to(torch.int32)  # < 2**23 entries per table
            destination[f"{prefix}{name}_value"] = flat[index]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        ours = set()
        for name, counts in self._tables():
            keys = f"{prefix}{name}_index", f"{prefix}{name}_value"
            ours.update(keys)
            if not all(key in state_dict for key in keys):
                missing_keys.extend(key for key in keys if key not in state_dict)
                continue
            index, value = state_dict[keys[0]], state_dict[keys[1]]
            if (
                index.dim() != 1
                or index.shape != value.shape
                or index.is_floating_point()
                or (len(index) and not 0 <= int(index.min()) <= int(index.max()) < counts.numel())
            ):
                error_msgs.append(f"{prefix}{name}: sparse counts do not fit a {tuple(counts.shape)} table")
                continue
            counts.zero_()
            counts.view(-1)[index.long().to(counts.device)] = value.to(counts.device, counts.dtype)
        if strict:
            unexpected_keys.extend(key for key in state_dict if key.startswith(prefix) and key not in ours)

    def contexts(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """For inputs (B, T): per order k, the id of the context of the last k inputs."""
        bos = self.vocab_size
        out, h = [idx], idx
        for k in range(2, self.max_order + 1):
            shifted = torch.cat([torch.full_like(idx[:, : k - 1], bos), idx[:, : -(k - 1) or None]], dim=1)
            h = (h * (bos + 1) + shifted) % (1 << 31) * _MULT % (1 << 31)
            out.append(h >> (31 - self.hash_bits))
        return out

    def forward(self, idx: torch.Tensor, leave_out: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities (B, T, K, V) of the next token after each input position.

        `leave_out` (B, T): targets already in the counts (training again on coded data); each
        is taken out of its own context's counts, so the model learns to trust the counts as
        they are when a token is new, not as they are once it has been counted (a leak that
        makes every replay step teach over-confidence in the long contexts)."""
        out = []
        if leave_out is not None:
            present = (leave_out >= 0).float()[..., None]
            leave_out = leave_out.clamp(min=0)[..., None]
        for k, ctx in enumerate(self.contexts(idx), start=1):
            counts = getattr(self, f"counts{k}")[ctx]
            if leave_out is not None:
                counts = counts.scatter_add(-1, leave_out, -present)
            counts = counts + self.alpha
            out.append(portable_math.log(counts) - portable_math.log(counts.sum(-1, keepdim=True)))
        return torch.stack(out, dim=2)

    @torch.no_grad()
    def update(self, idx: torch.Tensor, targets: torch.Tensor, ignore: int) -> None:
        """Count the coded tokens `targets` (B, T) after their contexts in the inputs `idx`."""
        keep = targets != ignore
        ones = torch.ones(int(keep.sum()), device=targets.device)
        # Integer-valued float32 sums are exact (below 2**24): accumulation order cannot matter.
        for k, ctx in enumerate(self.contexts(idx), start=1):
            getattr(self, f"counts{k}").index_put_((ctx[keep], targets[keep]), ones, accumulate=True)
