"""K GPTs trained side by side, coding each token with a mixture whose weights come from the past.

Each member learns from its own loss on the same batches, exactly as it would alone. The code
uses the mixture P(x) = Σ_k w_k P_k(x), with weights from the coded prefix only, so Bob, who
trains all K members on the tokens he decodes, computes the same weights:

* ``bayes``: w_k ∝ (1/K) Π P_k(every token coded so far): the Bayesian mixture. Its code length
  telescopes to -log2 Σ_k (1/K) P_k(data) ≤ min_k (-log2 P_k(data)) + log2 K: never more than
  log2 K bits worse than the best member in hindsight.
* ``switch``: fixed share (Herbster & Warmuth 1998): before each column, a fraction
  `switch_rate` of the weight is spread evenly over all members, so a member that was bad early
  (a big model's slow start) can take over later within a few tokens: the catch-up problem of
  the prequential code (Blier & Ollivier 2018) without paying for the big model's start.

Tokens are coded column by column (all rows at position t, then t + 1: `code_batch`'s order), row
by row within a column, and the weights are updated after every token: in float64, through
`torch.cumsum` down each column, so Alice's one pass over a batch and Bob's token-by-token
decoding compute the same bits (cumsum adds in order; row r's value depends on rows < r only).
"""

import math

import torch
import torch.nn as nn

from prequel.models import portable_math
from prequel.models.gpt import GPT, GPTConfig


class MixtureCache:
    """One KV cache per member, stepped together (see GPT.forward_step)."""

    def __init__(self, caches: list):  # models.kv_cache.KVCache, one per member
        self.caches = caches

    @property
    def pos(self) -> int:
        return self.caches[0].pos


class Mixture(nn.Module):
    def __init__(self, configs: list[GPTConfig], weights: str = "bayes", switch_rate: float = 0.0, seed: int = 0):
        super().__init__()
        members = []
        for c in configs:  # each initialised as it would be alone with this seed: it then trains as alone
            torch.manual_seed(seed)
            members.append(GPT(c))
        self.members = nn.ModuleList(members)
        self.config = configs[0]  # what the members share: vocabulary, block size, positions
        self.switch_rate = switch_rate if weights == "switch" else 0.0  # bayes: no sharing
        k = len(configs)
        # log weights before the next coded token (normalised): part of the training state, checkpointed
        self.register_buffer("log_w", torch.full((k,), -math.log(k), dtype=torch.float64))
        # each member's own code length Σ_k so far (bits), to compare the mixture with
        self.register_buffer("member_bits", torch.zeros(k, dtype=torch.float64))
        self.ngram = None  # no n-gram prior (refused in the config)

    def num_params(self) -> int:
        return sum(m.num_params() for m in self.members)

    def forward(self, idx: torch.Tensor, leave_out: torch.Tensor | None = None, logits: bool = False) -> torch.Tensor:
        """Member log-probabilities (B, T, K, V), float32 (`logits`: the members' logits, which training
        takes its members' losses from exactly as each would alone: training/module.py)."""
        out = torch.stack([m(idx, leave_out).float() for m in self.members], dim=2)
        return out if logits else torch.log_softmax(out, -1)

    def new_cache(self, batch: int, device=None) -> MixtureCache:
        return MixtureCache([m.new_cache(batch, device) for m in self.members])

    def forward_step(self, idx: torch.Tensor, cache: MixtureCache) -> torch.Tensor:
        """Member log-probabilities (B, K, V) of the next token (see GPT.forward_step)."""
        return torch.stack(
            [torch.log_softmax(m.forward_step(idx, c).float(), -1) for m, c in zip(self.members, cache.caches)], dim=1
        )

    def mix_batch(
        self, member_lp: torch.Tensor, targets: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Alice's pass: mixture log-probabilities (B, T, V) of every position of a batch whose
        tokens are all known, with weights from the tokens coded before each one; and the log
        weights after the batch. member_lp (B, T, K, V); targets (B, T); present (B, T) bool."""
        mixer = self.column_mixer(len(targets), member_lp.device)
        token_lp = member_lp.gather(-1, targets.clamp(min=0)[:, :, None, None].expand(*member_lp.shape[:3], 1))[..., 0]
        out = []
        for t in range(targets.shape[1]):
            mixed = mixer.mix(member_lp[:, t], mixer.before_rows(token_lp[:, t], present[:, t]))
            out.append(mixed)
            mixer.end_column()
        return torch.stack(out, dim=1), mixer.log_w

    @torch.no_grad()
    def observe(self, log_w: torch.Tensor, member_nll: torch.Tensor) -> None:
        """After a coded batch: the weights `mix_batch` ended with, and the members' NLL (B, L, K) nats."""
        self.log_w.copy_(log_w)
        self.member_bits += member_nll.double().sum((0, 1)) / math.log(2)

    def column_mixer(self, batch: int, device=None) -> "ColumnMixer":
        return ColumnMixer(self.log_w.clone(), batch, self.switch_rate, device)


class ColumnMixer:
    """The weights as coding goes: `before_rows` gives each row's log weights from the tokens of
    earlier columns and of the rows above in this column; `end_column` folds the column in.
    Alice calls it once per column with every row known; Bob once per row as he decodes it
    (`observe`); both reach the same floats because each row's weights come from the same
    cumsum prefix."""

    def __init__(self, log_w: torch.Tensor, batch: int, switch_rate: float, device=None):
        self.log_w, self.switch_rate = log_w.to(device), switch_rate
        self.column = torch.zeros(batch, len(log_w), dtype=torch.float64, device=device)  # coded rows' log P_k

    def before_rows(self, token_lp: torch.Tensor | None = None, present: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) log weights for each row of this column (rows < r folded in for row r). With
        `token_lp` (B, K) and `present` (B,), the whole column is taken as coded."""
        if token_lp is not None:
            self.column = torch.where(present[:, None], token_lp.double(), 0.0)
        above = torch.cat([torch.zeros_like(self.column[:1]), self.column.cumsum(0)[:-1]])
        return self.log_w[None] + above

    def observe(self, row: int, token_lp: torch.Tensor) -> None:
        """Bob: row `row` of this column was decoded; token_lp (K,) are the members' log P of it."""
        self.column[row] = token_lp.double()

    @staticmethod
    def mix(member_lp: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
        """(R, V) float32 log Σ_k w_k P_k from member_lp (R, K, V) and unnormalised log_w (R, K)."""
        log_w = torch.log_softmax(log_w, dim=-1)
        return portable_math.logsumexp(log_w[:, :, None] + member_lp.double(), dim=1).float()

    def end_column(self) -> None:
        log_w = torch.log_softmax(self.log_w + self.column.cumsum(0)[-1], dim=-1)  # the sum as both sides add it
        if self.switch_rate:  # fixed share: (1 - a) w + a / K
            k = len(log_w)
            log_w = portable_math.log((1 - self.switch_rate) * torch.softmax(log_w, -1) + self.switch_rate / k)
        self.log_w = log_w
        self.column.zero_()
