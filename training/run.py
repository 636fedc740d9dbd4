"""The Trainer both sides build (`build_trainer`), and Bob's replay (`verify`).

The coding itself is in callbacks/arithmetic_stream.py (StreamEncoder for Alice, StreamDecoder
for Bob) and training/coding.py. Alice's run (run directory, checkpoints, `fit`) is in
tools/fit.py and what it reports in tools/run.py: outside f, since Bob runs neither."""

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import torch

from callbacks.arithmetic_stream import StreamDecoder
from callbacks.code_length import CodeLength
from training.config import MAX_THREADS, Config, ConfigError, dump_yaml
from training.curriculum import order_bits
from training.environment import KernelError, device_of, ensure_kernels, require_device
from training.environment import check as check_environment
from training.data import PrequelDataModule, Tape, plan_options
from training.header import TrainingHeader
from training.module import PrequelModule
from training.program import code_hash, f_parts
from training.stream import Stream, StreamError, read_stream, write_atomic

STREAM_NAME = "stream.prequel"


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


def build_trainer(config: Config, tape: Tape, vocab_size: int, callbacks: list, loggers, run_dir: Path,
                  labels: torch.Tensor | None = None, checkpointing: bool = False, plugins: list | None = None):
    """The module, data and Trainer both sides run. Alice adds her checkpoint callback and
    writer (`checkpointing`, `plugins`: tools/fit.py); Bob writes nothing."""
    module = PrequelModule(config, vocab_size)
    module.attach(tape)
    if config.trainer.compile:
        module.model.compile()
    data = PrequelDataModule(tape, config.model.block_size, config.data.batch_size, config.data.curriculum, config.seed,
                             labels=labels, **plan_options(config.data))
    t = config.trainer
    trainer = L.Trainer(
        default_root_dir=run_dir, max_epochs=t.max_epochs, max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches, precision=t.precision,
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy,
        gradient_clip_val=config.optim.grad_clip or None, log_every_n_steps=t.log_every_n_steps,
        callbacks=callbacks, logger=loggers or False, enable_checkpointing=checkpointing, plugins=plugins,
        enable_progress_bar=config.logging.progress_bar, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
    )
    return module, data, trainer


def find_stream(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / STREAM_NAME
    if not path.is_file():
        raise StreamError(f"no stream at {path} (give a run directory or a {STREAM_NAME} file)")
    return path


@dataclass
class Receiver:
    """What Bob builds from a stream's header before he trains: f's config, tokenizer and order."""

    header: TrainingHeader
    config: Config
    tokenizer: object
    labels: torch.Tensor | None
    environment_differences: list[str]

    def code_length(self) -> CodeLength:
        return CodeLength(f_parts(dump_yaml(self.config), self.tokenizer.serialize(), order_bits(self.labels)),
                          self.header.data_tokens)

    def trainer(self, tape: Tape, callbacks: list, run_dir: Path):
        return build_trainer(self.config, tape, self.tokenizer.vocab_size, callbacks, [], run_dir, labels=self.labels)


def receiver(stream: Stream, allow_env_mismatch: bool = False, threads: int | None = None) -> Receiver:
    """f from the stream header, checked against this code and machine, set up to replay."""
    header = TrainingHeader.from_dict(stream.header)
    config, labels = header.program(), header.labels()
    if header.code_hash != code_hash():
        raise StreamError("the stream was written by different prequel source code (code hash differs); "
                          "check out the commit that wrote it")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ConfigError(f"--threads: must be in 1..{MAX_THREADS}, got {threads}")
    config = replace(
        config, run_dir=None,
        trainer=replace(config.trainer, num_threads=threads or config.trainer.num_threads),
        logging=replace(config.logging, wandb=False, csv=False, plot=False),
    )
    try:
        require_device(header.environment)  # before the config's accelerator is used
        set_determinism(config)
        diffs = check_environment(header.environment, config.trainer.kernels, config.trainer.accelerator,
                                  allow_env_mismatch, error=StreamError)
    except KernelError as e:
        raise StreamError(str(e)) from None
    return Receiver(header, config, header.tokenizer(), labels, diffs)


def replay(bob: Receiver, module, datamodule, trainer, ckpt_path: Path | None = None) -> None:
    """Train as the encoder did (decoding as the callbacks say); a drift names the environment."""
    try:
        trainer.fit(module, datamodule, ckpt_path=ckpt_path, weights_only=True)
    except StreamError as e:
        if bob.environment_differences:  # the user accepted a different environment: name the likely cause
            raise StreamError(f"{e} (the environment differs from the encoder's: "
                              f"{'; '.join(bob.environment_differences)})") from None
        raise


def verify(path: Path, out: Path | None = None, allow_env_mismatch: bool = False,
           threads: int | None = None) -> dict | None:
    """Bob: rebuild f from the stream header, replay training while decoding, check everything.
    A run of N processes replays with N (Lightning starts the others); rank 0 reports, the others
    return None."""
    stream_path = find_stream(path)
    stream = read_stream(stream_path)
    bob = receiver(stream, allow_env_mismatch, threads)
    config, tokenizer, n_tokens = bob.config, bob.tokenizer, bob.header.data_tokens
    try:
        tape = Tape(torch.zeros(n_tokens, dtype=torch.long), bos_id=tokenizer.vocab_size, nbytes_per_id=tokenizer.nbytes_per_id())
    except (RuntimeError, MemoryError):
        raise StreamError(f"the header claims {n_tokens:,} tokens: more than this machine can hold") from None
    code_length = bob.code_length()
    decoder = StreamDecoder(tape, config.stream.checksum_every, config.stream.procedure, stream=stream)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        module, datamodule, trainer = bob.trainer(tape, [code_length, decoder], Path(tmp))
        replay(bob, module, datamodule, trainer)
    seconds = time.perf_counter() - started
    totals = code_length.totals()  # (synced: every process takes part)
    if not trainer.is_global_zero:
        return None
    decoded = tokenizer.decode(tape.tokens)
    expected_sha = stream.trailer.get("data_sha256")
    if expected_sha is not None and hashlib.sha256(decoded).hexdigest() != expected_sha:
        raise StreamError("decoded bytes do not match the original's sha256")
    weights_checked = _compare_checkpoint(Path(path), module)
    report = {
        "stream": str(stream_path), "tokens": decoder.coded_tokens, "bytes": len(decoded),
        "ideal_bits": totals["data_bits"], "stream_bits": stream.payload_bits,
        "overhead_bits": stream.payload_bits - totals["data_bits"], "sha256": hashlib.sha256(decoded).hexdigest(),
        "complete": expected_sha is not None, "final_weights_equal_checkpoint": weights_checked,
        "environment_differences": bob.environment_differences, "seconds": seconds,
    }
    if expected_sha is not None:
        out = Path(out) if out else stream_path.with_suffix(".decoded")
        write_atomic(out, decoded)
        report["output"] = str(out)
    return report


def _compare_checkpoint(path: Path, module: PrequelModule) -> bool | str | None:
    """Final weights bitwise equal to the encoder's final checkpoint, when it sits beside the stream
    (None: no checkpoint; a string: why it could not be read; the stream's own checks still hold)."""
    ckpt = (path if path.is_dir() else path.parent) / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        return None
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as e:  # damaged or foreign file: pickle, zip and torch errors alike
        return f"the checkpoint {ckpt} beside the stream cannot be read ({type(e).__name__}); final weights not compared"
    ours = module.state_dict()
    if state.keys() != ours.keys() or not all(torch.equal(state[k], ours[k].cpu()) for k in ours):
        raise StreamError(f"decoded training ended with weights that differ from the encoder's checkpoint {ckpt}")
    return True
