"""Alice's run: the run directory, its checkpoints, and training with the stream on (`fit`).

Outside f: Bob never runs any of this. He builds the same Trainer (training/run.py:
`build_trainer`) from the stream's header and replays; Alice additionally tokenizes the data,
owns a run directory (identity, lock, atomic checkpoints, resume) and writes the stream.
"""

import fcntl
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from prequel.alice.corpus import order_labels
from prequel.alice.difficulty import labels_to_header, order_bits
from prequel.alice.encoder import StreamEncoder
from prequel.alice.shards import Corpus, open_corpus, token_shards
from prequel.alice.tokenizing import build_tokenizer
from prequel.callbacks.code_length import CodeLength
from prequel.checks.machine import facts as environment_facts
from prequel.checks.memory import check_memory
from prequel.checks.settings import Config, ConfigError, counted_yaml, dump_yaml, program_dict
from prequel.files import TEMP_SUFFIX, write_atomic
from prequel.program import code_hash, f_parts
from prequel.training.data import DataError, PrequelDataModule, Tape
from prequel.training.header import TrainingHeader
from prequel.training.module import PrequelModule
from prequel.training.run import build_trainer, set_determinism
from prequel.verify.verifier import STREAM_NAME

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


def tokenize(config: Config, corpus: Corpus):
    """The tokenizer and the corpus's ids as token shards (tokenised once, then from the cache)."""
    tokenizer = build_tokenizer(
        config.data.tokenizer, data=corpus, vocab_size=config.data.vocab_size, pretrained=config.data.tokenizer_file
    )
    tokens = token_shards(corpus, tokenizer)
    if len(tokens) < config.model.block_size:
        raise DataError(
            f"corpus too short: {len(tokens)} tokens, less than one sequence "
            f"(model.block_size = {config.model.block_size})"
        )
    return tokenizer, tokens


def _identity(config: Config, data_sha256: str) -> dict:
    return {"config": program_dict(config), "data_sha256": data_sha256}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def check_run_dir(run_dir: Path, config: Config, data_sha256: str) -> None:
    """Refuse to resume (or report) a run directory that holds a run of other settings or data:
    its checkpoint and stream would be mixed into this command's code length."""
    path = Path(run_dir) / IDENTITY_NAME
    if not path.is_file():
        return
    try:
        theirs = json.loads(path.read_text())
        theirs_config, theirs_sha = _flat(theirs["config"]), theirs["data_sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(
            f"run_dir: {path} is damaged; use another --run_dir (or delete {run_dir} to start over)"
        ) from None
    ours = _identity(config, data_sha256)
    ours_config = _flat(ours["config"])
    diffs = [
        f"{k}: the run has {theirs_config.get(k)!r}, this command {ours_config.get(k)!r}"
        for k in sorted(set(theirs_config) | set(ours_config))
        if theirs_config.get(k) != ours_config.get(k)
    ]
    if theirs_sha != ours["data_sha256"]:
        diffs.append(f"data: the run's sha256 is {theirs_sha[:16]}…, this command's {ours['data_sha256'][:16]}…")
    if diffs:
        raise ConfigError(
            f"run_dir {run_dir} holds a run of other settings or data ({'; '.join(diffs)}); "
            "use another --run_dir, or delete it to start over"
        )


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
        raise ConfigError(
            f"run_dir {run_dir} is in use by another training process; wait for it, or use another --run_dir"
        ) from None
    _LOCKS[run_dir.resolve()] = fd


_LOCKS: dict[Path, int] = {}


def stream_header(config: Config, tokenizer, n_tokens: int, labels: torch.Tensor | None = None) -> dict:
    return TrainingHeader(
        config=program_dict(config),
        tokenizer_name=tokenizer.name,
        tokenizer_blob=tokenizer.serialize(),
        data_tokens=n_tokens,
        code_hash=code_hash(),
        environment=environment(config),
        precision=config.trainer.precision,
        compile=config.trainer.compile,
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


def fit(
    config: Config,
    run_dir: Path,
    loggers: list | None = None,
    extra_callbacks: list | None = None,
    corpus: Corpus | None = None,
) -> Fitted:
    """Alice: train with the code length (and the stream) on, resuming from the run's last
    checkpoint, and write the stream. `loggers` and `extra_callbacks` watch or stop training
    (a size sweep's wall-clock budget); they change no bit of it."""
    corpus = corpus or open_corpus(config.data.path)  # errors before anything is created
    set_determinism(config)
    tokenizer, tokens = tokenize(config, corpus)  # a too-short corpus fails before the run directory exists
    check_memory(config, len(tokens))  # the plan and replay over this many tokens, before anything is built
    check_run_dir(run_dir, config, corpus.sha256())
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run_dir: cannot create the directory {run_dir}: {e.strerror}") from None
    if os.environ.get("LOCAL_RANK", "0") == "0":  # (DDP's other ranks re-run this while rank 0 writes)
        _lock(run_dir)
        remove_stale_temps(run_dir)  # what a kill mid-write left; the files themselves are whole
        write_atomic(
            run_dir / IDENTITY_NAME, json.dumps(_identity(config, corpus.sha256()), indent=1, sort_keys=True).encode()
        )
    tape = Tape(tokens, bos_id=tokenizer.vocab_size, nbytes_per_id=tokenizer.nbytes_per_id())
    config_text = dump_yaml(config)
    (run_dir / "config.yaml").write_text(config_text)
    labels = order_labels(config.data, config.chunk_len, tokenizer, tokens)
    code_length = CodeLength(
        f_parts(config, counted_yaml(config), tokenizer.serialize(), order_bits(labels)), len(tokens)
    )
    started = _TrainStarted()
    callbacks: list = [code_length]
    stream = None
    if config.stream.enabled:
        stream = StreamEncoder(
            tape,
            config.stream.checksum_every,
            config.stream.procedure,
            header=stream_header(config, tokenizer, len(tokens), labels),
        )
        callbacks.append(stream)
    keep = config.trainer.keep_checkpoints
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="{step}",
        save_last="link" if keep else True,
        save_top_k=-1 if keep else 0,
        enable_version_counter=False,
        every_n_train_steps=config.trainer.checkpoint_every_n_steps or None,
    )
    module, datamodule, trainer = build_trainer(
        config,
        tape,
        tokenizer.vocab_size,
        callbacks + [started, checkpoints] + (extra_callbacks or []),
        loggers or [],
        run_dir,
        labels=labels,
        checkpointing=True,
        plugins=[AtomicCheckpointIO()],
    )
    if trainer.is_global_zero:
        print(
            f"prequel: {module.model.num_params():,} parameters (a tied embedding counted once), "
            f"{len(tokens):,} tokens, run directory {run_dir}"
        )
    try:
        trainer.fit(module, datamodule, ckpt_path=resume_point(run_dir), weights_only=True)
    except SIGTERMException:  # (Lightning stops at the end of a batch and would exit 0)
        last = save_checkpoint(trainer, run_dir, config.trainer.keep_checkpoints)
        raise Interrupted(
            f"stopped by SIGTERM after {trainer.global_step} steps; {last} holds everything so far: "
            "re-run the same command to resume"
        ) from None
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
        stream.save(
            stream_path,
            {"data_sha256": corpus.sha256() if totals["complete"] else None, "ideal_bits": totals["data_bits"]},
        )
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


def link_atomic(target: str, link: Path) -> None:
    """Point the symlink `link` at `target` (relative to its directory) by a rename: a reader sees
    the old link or the new one, never none."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}{TEMP_SUFFIX}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temp files a killed `write_atomic` left in `directory` (recursively).

    Only call this where no other process is writing (a run directory being resumed): a temp
    file is never a valid result, it is whatever a crash interrupted."""
    stale = [p for p in Path(directory).rglob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
