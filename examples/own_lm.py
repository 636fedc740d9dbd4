"""The prequential code length of a language model of your own, with prequel's `CodeLength` callback.

    python examples/own_lm.py [--bytes 100000] [--seq-len 64] [--batch-size 8] [--out runs/own-lm]

A plain Lightning causal LM (a byte-level LSTM, not prequel's GPT) trains one pass over the bundled
tinyshakespeare. All it does for prequel is store, in `training_step`, the per-token NLL of the batch
under the weights from before the optimizer step learns it (``self.coded``, a `CodedTokens`): the
contract in callbacks/contract.py. `CodeLength` adds those NLLs up as Σ (bits) and logs
``code/bpb`` and ``code/data_bpb`` to CSV and (offline) W&B like any metric. |f| here is this file,
compressed: the program that a receiver would run to decode. Writing a verifiable stream needs the
module's code inside f, so that is prequel's own `PrequelModule`'s (training/module.py) and not done here.
"""

import argparse
import math
import os
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prequel.callbacks.code_length import CodeLength
from prequel.callbacks.contract import CodedTokens
from prequel.program import packed_bits
from prequel.resources import BUNDLED_CORPUS

BOS = 256  # starts every sequence: each byte, the first of a chunk too, is predicted from what precedes it


def byte_chunks(data: bytes, seq_len: int) -> TensorDataset:
    """(inputs, targets) of consecutive chunks that cover every byte exactly once (the last padded with -100)."""
    n = -(-len(data) // seq_len)
    targets = torch.full((n * seq_len,), -100, dtype=torch.long)
    targets[: len(data)] = torch.tensor(list(data))
    targets = targets.view(n, seq_len)
    inputs = torch.cat([torch.full((n, 1), BOS), targets[:, :-1].clamp(min=0)], dim=1)
    return TensorDataset(inputs, targets)


class ByteLSTM(L.LightningModule):
    def __init__(self, width: int = 128, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(257, width)
        self.lstm = nn.LSTM(width, width, batch_first=True)
        self.head = nn.Linear(width, 256)
        self.coded: CodedTokens | None = None  # the contract: CodeLength reads it after each step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(x))[0])

    def training_step(self, batch, batch_idx):
        x, y = batch
        mask = y != -100
        nll = F.cross_entropy(self(x).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none").view_as(y)
        # Before Lightning's optimizer step: the probabilities a sender would code this batch with.
        self.coded = CodedTokens(nll.detach(), mask, nbytes=int(mask.sum()), first_pass=self.current_epoch == 0)
        loss = nll.sum() / mask.sum()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=int, default=100_000, help="code the first N bytes of tinyshakespeare")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/own-lm"))
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")  # no account, no network: `wandb sync` later

    data = BUNDLED_CORPUS.read_bytes()[: args.bytes]
    chunks = byte_chunks(data, args.seq_len)
    f_parts = {"source": packed_bits(Path(__file__).read_bytes()), "data_length": 64}
    code_length = CodeLength(f_parts, total_tokens=len(data))
    loggers = [L.pytorch.loggers.CSVLogger(args.out, name="csv", version="")]
    try:
        loggers.append(L.pytorch.loggers.WandbLogger(project="prequel-examples", save_dir=str(args.out)))
    except ModuleNotFoundError:  # (wandb is one of prequel's requirements; CSV alone works too)
        pass
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_epochs=1,
        logger=loggers,
        callbacks=[code_length],
        log_every_n_steps=10,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    trainer.fit(ByteLSTM(), DataLoader(chunks, batch_size=args.batch_size, shuffle=False))

    t = code_length.totals()
    total = code_length.f_bits + t["tokens"] + t["data_bits"]  # |f| + n + Σ
    print(
        f"Σ −log2 P   {t['data_bits']:>12,.0f} bits over {t['tokens']:,} bytes ({t['data_bits'] / t['nbytes']:.4f} bpb)"
    )
    print(f"|f| + n     {code_length.f_bits + t['tokens']:>12,} bits (this file compressed, and ≤ 1 bit a token)")
    print(f"code length {total:>12,.0f} bits = {total / t['nbytes']:.4f} bpb (uniform: {math.log2(256):.0f})")
    print(f"curves: {args.out / 'csv' / 'metrics.csv'} (code/bpb, code/data_bpb)")


if __name__ == "__main__":
    main()
