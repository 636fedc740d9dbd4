"""Alice's training (`fit`) and Bob's replay (`verify`): the same Trainer, model and data plan.

The coding itself is in callbacks/arithmetic_stream.py (StreamEncoder for Alice, StreamDecoder
for Bob) and training/coding.py; what a run reports (summary, plots) is in tools/run.py, outside f."""

import fcntl
import hashlib
import io
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.arithmetic_stream import StreamDecoder, StreamEncoder
from callbacks.code_length import CodeLength
from training.config import MAX_THREADS, Config, ConfigError, check_memory, dump_yaml, program_dict
from training.curriculum import labels_to_header, order_bits
from training.environment import KernelError, device_of, ensure_kernels, require_device
from training.environment import check as check_environment
from training.environment import facts as environment_facts
from training.data import DataError, PrequelDataModule, Tape, order_labels, plan_options, read_corpus
from training.header import TrainingHeader
from training.module import PrequelModule
from training.program import code_hash, f_parts
from training.stream import Stream, StreamError, link_atomic, read_stream, remove_stale_temps, write_atomic
from training.tokenizer import build_tokenizer

STREAM_NAME = "stream.prequel"
IDENTITY_NAME = "run.json"  # what the run directory is a run of: the program's settings + the data's sha256
LOCK_NAME = ".lock"


class Interrupted(Exception):
    """Training stopped by a signal; the run directory's last checkpoint resumes it."""


def environment(config: Config) -> dict:
    return environment_facts(config.trainer.kernels, config.trainer.accelerator)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints via `write_atomic` (temp file beside it + fsync + rename): a kill or a full
    disk leaves the previous checkpoint whole. Lightning's own writer stages the file in the
    system temp directory, where a kill strands it and another filesystem makes the move a copy."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomic(Path(path), buffer.getvalue())


class _TrainStarted(L.Callback):
    ran = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.ran = True


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


def tokenize(config: Config, data: bytes):
    tokenizer = build_tokenizer(config.data.tokenizer, data=data, vocab_size=config.data.vocab_size,
                                pretrained=config.data.tokenizer_file)
    tokens = tokenizer.encode(data)
    if len(tokens) < config.model.block_size:
        raise DataError(
            f"corpus too short: {len(tokens)} tokens, less than one sequence (model.block_size = {config.model.block_size})"
        )
    return tokenizer, tokens


def build_trainer(config: Config, tape: Tape, vocab_size: int, callbacks: list, loggers, run_dir: Path, checkpoint: bool,
           labels: torch.Tensor | None = None):
    module = PrequelModule(config, vocab_size)
    module.attach(tape)
    if config.trainer.compile:
        module.model.compile()
    data = PrequelDataModule(tape, config.model.block_size, config.data.batch_size, config.data.curriculum, config.seed,
                             labels=labels, **plan_options(config.data))
    if checkpoint:
        keep = config.trainer.keep_checkpoints
        callbacks = callbacks + [ModelCheckpoint(
            dirpath=run_dir / "checkpoints", filename="{step}", save_last="link" if keep else True,
            save_top_k=-1 if keep else 0, enable_version_counter=False,
            every_n_train_steps=config.trainer.checkpoint_every_n_steps or None,
        )]
    t = config.trainer
    trainer = L.Trainer(
        default_root_dir=run_dir, max_epochs=t.max_epochs, max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches, precision=t.precision,
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy,
        gradient_clip_val=config.optim.grad_clip or None, log_every_n_steps=t.log_every_n_steps,
        callbacks=callbacks, logger=loggers or False, enable_checkpointing=checkpoint, plugins=[AtomicCheckpointIO()],
        enable_progress_bar=config.logging.progress_bar, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
    )
    return module, data, trainer


def _identity(config: Config, data: bytes) -> dict:
    return {"config": program_dict(config), "data_sha256": hashlib.sha256(data).hexdigest()}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def check_run_dir(run_dir: Path, config: Config, data: bytes) -> None:
    """Refuse to resume (or report) a run directory that holds a run of other settings or data:
    its checkpoint and stream would be mixed into this command's code length."""
    path = Path(run_dir) / IDENTITY_NAME
    if not path.is_file():
        return
    try:
        theirs = json.loads(path.read_text())
        theirs_config, theirs_sha = _flat(theirs["config"]), theirs["data_sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"run_dir: {path} is damaged; use another --run_dir (or delete {run_dir} to start over)") from None
    ours = _identity(config, data)
    ours_config = _flat(ours["config"])
    diffs = [f"{k}: the run has {theirs_config.get(k)!r}, this command {ours_config.get(k)!r}"
             for k in sorted(set(theirs_config) | set(ours_config)) if theirs_config.get(k) != ours_config.get(k)]
    if theirs_sha != ours["data_sha256"]:
        diffs.append(f"data: the run's sha256 is {theirs_sha[:16]}…, this command's {ours['data_sha256'][:16]}…")
    if diffs:
        raise ConfigError(f"run_dir {run_dir} holds a run of other settings or data ({'; '.join(diffs)}); "
                          "use another --run_dir, or delete it to start over")


def _lock(run_dir: Path) -> None:
    """One process per run directory: a second one would interleave checkpoints and streams.
    The lock is the OS's (flock): it goes with the process, however it ends. This process may
    train in it again (a resumed run, a sweep); it holds the lock until it ends."""
    if run_dir.resolve() in _LOCKS:
        return
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"run_dir {run_dir} is in use by another training process; wait for it, or use "
                          "another --run_dir") from None
    _LOCKS[run_dir.resolve()] = fd


_LOCKS: dict[Path, int] = {}


def stream_header(config: Config, tokenizer, n_tokens: int, labels: torch.Tensor | None = None) -> dict:
    return TrainingHeader(
        config=program_dict(config), tokenizer_name=tokenizer.name, tokenizer_blob=tokenizer.serialize(),
        data_tokens=n_tokens, code_hash=code_hash(), environment=environment(config),
        precision=config.trainer.precision, compile=config.trainer.compile,
        # a content-dependent order: the decoder plans batches before it has data
        order=None if labels is None else labels_to_header(labels),
    ).to_dict()


@dataclass
class Fitted:
    """What Alice's training leaves: the sums, the stream and the objects a report reads."""

    config: Config
    run_dir: Path
    tokenizer: object
    tape: Tape
    datamodule: PrequelDataModule
    module: PrequelModule
    trainer: L.Trainer
    code_length: CodeLength
    stream: StreamEncoder | None
    stream_path: Path | None


def fit(config: Config, run_dir: Path, loggers: list | None = None, extra_callbacks: list | None = None) -> Fitted:
    """Alice: train with the code length (and the stream) on, resuming from the run's last
    checkpoint, and write the stream. `loggers` and `extra_callbacks` watch or stop training
    (a size sweep's wall-clock budget); they change no bit of it."""
    data = read_corpus(config.data.path)  # errors before anything is created
    set_determinism(config)
    tokenizer, tokens = tokenize(config, data)  # a too-short corpus fails before the run directory exists
    check_memory(config, len(tokens))  # the plan and replay over this many tokens, before anything is built
    check_run_dir(run_dir, config, data)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run_dir: cannot create the directory {run_dir}: {e.strerror}") from None
    if os.environ.get("LOCAL_RANK", "0") == "0":  # (DDP's other ranks re-run this while rank 0 writes)
        _lock(run_dir)
        remove_stale_temps(run_dir)  # what a kill mid-write left; the files themselves are whole
        write_atomic(run_dir / IDENTITY_NAME, json.dumps(_identity(config, data), indent=1, sort_keys=True).encode())
    tape = Tape(tokens, bos_id=tokenizer.vocab_size, nbytes_per_id=tokenizer.nbytes_per_id())
    config_text = dump_yaml(config)
    (run_dir / "config.yaml").write_text(config_text)
    labels = order_labels(config.data, config.model.block_size, tokenizer, tokens)
    code_length = CodeLength(f_parts(config_text, tokenizer.serialize(), order_bits(labels)), len(tokens))
    started = _TrainStarted()
    callbacks: list = [code_length]
    stream = None
    if config.stream.enabled:
        stream = StreamEncoder(tape, config.stream.checksum_every, config.stream.procedure,
                               header=stream_header(config, tokenizer, len(tokens), labels))
        callbacks.append(stream)
    module, datamodule, trainer = build_trainer(config, tape, tokenizer.vocab_size,
                                                callbacks + [started] + (extra_callbacks or []), loggers or [],
                                                run_dir, checkpoint=True, labels=labels)
    if trainer.is_global_zero:
        print(f"prequel: {module.model.num_params():,} parameters (a tied embedding counted once), "
              f"{len(tokens):,} tokens, run directory {run_dir}")
    try:
        trainer.fit(module, datamodule, ckpt_path=resume_point(run_dir), weights_only=True)
    except SIGTERMException:  # (Lightning stops at the end of a batch and would exit 0)
        last = save_checkpoint(trainer, run_dir, config.trainer.keep_checkpoints)
        raise Interrupted(f"stopped by SIGTERM after {trainer.global_step} steps; {last} holds everything so far: "
                          "re-run the same command to resume") from None
    if not started.ran:  # killed after the final checkpoint, before the summary: Lightning skips the
        for callback in callbacks:  # finished loop and the hooks that restore the sums and close the stream
            callback.on_train_start(trainer, module)
            callback.on_train_end(trainer, module)
    # last.ckpt = the weights training ended with (periodic saves may predate the end), with the
    # callbacks' states: resumable. Atomic: the trainer writes through AtomicCheckpointIO, on rank 0.
    save_checkpoint(trainer, run_dir, config.trainer.keep_checkpoints)
    totals = code_length.totals()
    stream_path = None
    if stream is not None and trainer.is_global_zero:
        stream_path = run_dir / STREAM_NAME
        stream.save(stream_path, {
            "data_sha256": hashlib.sha256(data).hexdigest() if totals["complete"] else None,
            "ideal_bits": totals["data_bits"],
        })
    return Fitted(config, run_dir, tokenizer, tape, datamodule, module, trainer, code_length, stream, stream_path)


def save_checkpoint(trainer: L.Trainer, run_dir: Path, keep: bool) -> Path:
    """Everything so far as checkpoints/last.ckpt; with `keep`, as step=N.ckpt that last.ckpt
    links to, like the periodic saves (the audit starts stretches from them). Returns last.ckpt."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if not keep:
        trainer.save_checkpoint(last, weights_only=False)
        return last
    kept = last.with_name(f"step={trainer.global_step}.ckpt")
    trainer.save_checkpoint(kept, weights_only=False)
    if trainer.is_global_zero:
        link_atomic(kept.name, last)
    return last


def resume_point(run_dir: Path) -> Path | None:
    """The newest checkpoint: last.ckpt, or the newest step=N.ckpt if a kill came between
    ModelCheckpoint's removing the last.ckpt link and making the new one."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        return last
    kept = {int(m[1]): p for p in last.parent.glob("step=*.ckpt") if (m := re.fullmatch(r"step=(\d+)", p.stem))}
    return kept[max(kept)] if kept else None


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
        return build_trainer(self.config, tape, self.tokenizer.vocab_size, callbacks, [], run_dir,
                             checkpoint=False, labels=self.labels)


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
