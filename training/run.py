"""The Trainer both sides build (`build_trainer`), and Bob's decoding (`receiver`, `decode`).

The coding itself is in callbacks/arithmetic_stream.py (StreamEncoder for Alice, StreamDecoder
for Bob) and training/coding.py. Alice's run (run directory, checkpoints, `fit`) is in
prequel/alice/fit.py, and `verify` (the checks around `decode`, what it reports) in prequel/verify/verifier.py:
outside f, since Bob needs neither to decode."""

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from prequel.callbacks.arithmetic_stream import StreamDecoder
from prequel.training.config import Config
from prequel.training.data import PrequelDataModule, Tape, plan_options
from prequel.training.header import TrainingHeader
from prequel.training.kernels import device_of, ensure_kernels
from prequel.training.module import PrequelModule
from prequel.training.stream import Stream
from prequel.training.tokens import TokenShards, dtype_for


def set_determinism(config: Config) -> None:
    ensure_kernels(config.trainer.kernels)  # first: nothing may be computed with other kernels
    if config.trainer.num_threads:
        torch.set_num_threads(config.trainer.num_threads)
    L.seed_everything(config.seed, workers=True, verbose=False)
    if device_of(config.trainer.accelerator) == "cuda":  # bitwise replay on a GPU (untested here: no GPU lent)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS reductions
        # warn_only: the n-gram counts' scatter-adds add integers, exact in any order; anything
        # else that drifts is caught and named by the stream's parameter checksums.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        # Attention by the math kernel only: the memory-efficient and flash backwards add with
        # atomics (an H200 run warned so; warn_only would have let it drift).
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)


def build_trainer(
    config: Config,
    tape: Tape,
    vocab_size: int,
    callbacks: list,
    loggers,
    run_dir: Path,
    labels: torch.Tensor | None = None,
    checkpointing: bool = False,
    plugins: list | None = None,
):
    """The module, data and Trainer both sides run. Alice adds her checkpoint callback and
    writer (`checkpointing`, `plugins`: prequel/alice/fit.py); Bob writes nothing."""
    module = PrequelModule(config, vocab_size)
    tape.context = config.data.context  # (both sides' tapes: the inputs each batch reads before its span)
    module.attach(tape)
    if config.trainer.compile:
        module.model.compile()
    data = PrequelDataModule(
        tape,
        config.chunk_len,
        config.data.batch_size,
        config.data.curriculum,
        config.seed,
        labels=labels,
        **plan_options(config.data),
    )
    t = config.trainer
    if config.logging.progress_bar and device_of(t.accelerator) == "cuda":
        # The bar reads the logged values back at each refresh (a host sync): on a GPU, once per log interval.
        callbacks = [*callbacks, TQDMProgressBar(refresh_rate=t.log_every_n_steps)]
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        precision=t.precision,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        gradient_clip_val=config.optim.grad_clip or None,
        log_every_n_steps=t.log_every_n_steps,
        callbacks=callbacks,
        logger=loggers or False,
        enable_checkpointing=checkpointing,
        plugins=plugins,
        enable_progress_bar=config.logging.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
    )
    return module, data, trainer


@dataclass
class Receiver:
    """What Bob builds from a stream's header before he trains: f's config, tokenizer and order."""

    header: TrainingHeader
    config: Config
    tokenizer: object
    labels: torch.Tensor | None

    def tape(self, directory: Path | None = None) -> Tape:
        """The tape Bob decodes onto: data_tokens long, filled as batches are decoded; as shard
        files in `directory`, else in memory."""
        n, dtype = self.header.data_tokens, dtype_for(self.tokenizer.vocab_size)
        tokens = TokenShards.create(directory, n, dtype) if directory else TokenShards.in_memory(np.zeros(n, dtype))
        return Tape(tokens, bos_id=self.tokenizer.vocab_size, nbytes_per_id=self.tokenizer.nbytes_per_id())

    def trainer(self, tape: Tape, callbacks: list, run_dir: Path):
        return build_trainer(self.config, tape, self.tokenizer.vocab_size, callbacks, [], run_dir, labels=self.labels)


def receiver(header: TrainingHeader, threads: int | None = None) -> Receiver:
    """f from the stream header, set up to replay: the run's settings (writing nothing), kernels pinned."""
    config = header.program()
    config = replace(
        config,
        run_dir=None,
        trainer=replace(config.trainer, num_threads=threads or config.trainer.num_threads),
        logging=replace(config.logging, wandb=False, csv=False, plot=False),
    )
    set_determinism(config)
    return Receiver(header, config, header.tokenizer(), header.labels())


def decode(
    bob: Receiver, stream: Stream, callbacks: list = (), tape_dir: Path | None = None, decoder_type=StreamDecoder
) -> tuple[Tape | None, PrequelModule, StreamDecoder]:
    """Train as the encoder did, decoding each batch before its step: the decoded tape (in
    `tape_dir`, else in memory; on the first of N processes, the others get None; its bytes:
    `Tape.decoded`), and the trained module and the decoder (a `decoder_type`: verify's
    checked single steps are a StreamDecoder too)."""
    tape = bob.tape(tape_dir)
    decoder = decoder_type(tape, bob.config.stream.checksum_every, bob.config.stream.procedure, stream=stream)
    with tempfile.TemporaryDirectory() as tmp:
        module, datamodule, trainer = bob.trainer(tape, [*callbacks, decoder], Path(tmp))
        trainer.fit(module, datamodule, weights_only=True)
    return tape if trainer.is_global_zero else None, module, decoder
