"""Train (Alice) and verify (Bob): the same Trainer, model and data plan on both sides."""

import hashlib
import io
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO

from callbacks.arithmetic_stream import StreamDecoder, StreamEncoder
from callbacks.code_length import CodeLength
from training.config import Config, ConfigError, dump_yaml, program_dict, to_dict
from training.curriculum import labels_to_header, order_bits
from training.environment import KernelError, device_of, ensure_kernels, require_device
from training.environment import check as check_environment
from training.environment import facts as environment_facts
from training.data import DataError, PrequelDataModule, Tape, order_labels, plan_options, read_corpus
from training.header import TrainingHeader
from training.module import PrequelModule
from training.program import code_hash, program_bits
from training.report import code_length_summary, format_table, plot_loss_curve
from training.stream import StreamError, read_stream, remove_stale_temps, write_atomic
from training.tokenizer import build_tokenizer

STREAM_NAME = "stream.prequel"
SUMMARY_NAME = "summary.json"


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


def _set_determinism(config: Config) -> None:
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


def _tokens(config: Config, data: bytes):
    tokenizer = build_tokenizer(config.data.tokenizer, data=data, vocab_size=config.data.vocab_size,
                                pretrained=config.data.tokenizer_file)
    tokens = tokenizer.encode(data)
    if len(tokens) < config.model.block_size:
        raise DataError(
            f"corpus too short: {len(tokens)} tokens, less than one sequence (model.block_size = {config.model.block_size})"
        )
    return tokenizer, tokens


def _build(config: Config, tape: Tape, vocab_size: int, callbacks: list, loggers, run_dir: Path, checkpoint: bool,
           labels: torch.Tensor | None = None):
    module = PrequelModule(config, vocab_size)
    module.attach(tape)
    if config.trainer.compile:
        module.model.compile()
    data = PrequelDataModule(tape, config.model.block_size, config.data.batch_size, config.data.curriculum, config.seed,
                             labels=labels, **plan_options(config.data))
    if checkpoint:
        callbacks = callbacks + [ModelCheckpoint(
            dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0,
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


def _loggers(config: Config, run_dir: Path) -> list:
    loggers = []
    if config.logging.csv:
        loggers.append(L.pytorch.loggers.CSVLogger(run_dir, name="csv", version=""))
    if config.logging.wandb and config.logging.wandb_mode != "disabled":
        loggers.append(L.pytorch.loggers.WandbLogger(
            project=config.logging.wandb_project, name=run_dir.name, save_dir=str(run_dir),
            mode=config.logging.wandb_mode, config=to_dict(config), group=config.logging.wandb_group,
        ))
    return loggers


def stream_header(config: Config, tokenizer, n_tokens: int, labels: torch.Tensor | None = None) -> dict:
    return TrainingHeader(
        config=program_dict(config), tokenizer_name=tokenizer.name, tokenizer_blob=tokenizer.serialize(),
        data_tokens=n_tokens, code_hash=code_hash(), environment=environment(config),
        precision=config.trainer.precision, compile=config.trainer.compile,
        # a content-dependent order: the decoder plans batches before it has data
        order=None if labels is None else labels_to_header(labels),
    ).to_dict()


def train(config: Config, extra_callbacks: list | None = None) -> dict:
    """Train with the prequential code length (and stream) on; returns the summary.
    `extra_callbacks` watch or stop training (a size sweep's wall-clock budget); they change no bit of it."""
    data = read_corpus(config.data.path)  # errors before anything is created
    run_dir = Path(config.run_dir or f"runs/{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (run_dir / SUMMARY_NAME).exists():
        print(f"{run_dir} already finished; not training again. Summary: {run_dir / SUMMARY_NAME}")
        return json.loads((run_dir / SUMMARY_NAME).read_text())
    _set_determinism(config)
    tokenizer, tokens = _tokens(config, data)  # a too-short corpus fails before the run directory exists
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run_dir: cannot create the directory {run_dir}: {e.strerror}") from None
    if os.environ.get("LOCAL_RANK", "0") == "0":  # (DDP's other ranks re-run this while rank 0 writes)
        remove_stale_temps(run_dir)  # what a kill mid-write left; the files themselves are whole
    tape = Tape(tokens, bos_id=tokenizer.vocab_size, nbytes_per_id=tokenizer.nbytes_per_id())
    config_text = dump_yaml(config)
    (run_dir / "config.yaml").write_text(config_text)
    labels = order_labels(config.data, config.model.block_size, tokenizer, tokens)
    code_length = CodeLength(program_bits(config_text, tokenizer.serialize(), order_bits(labels)), len(tokens))
    started = _TrainStarted()
    callbacks: list = [code_length]
    if config.stream.enabled:
        stream = StreamEncoder(tape, config.stream.checksum_every, config.stream.procedure,
                               header=stream_header(config, tokenizer, len(tokens), labels))
        callbacks.append(stream)
    loggers = _loggers(config, run_dir)
    module, datamodule, trainer = _build(config, tape, tokenizer.vocab_size, callbacks + [started] + (extra_callbacks or []),
                                         loggers, run_dir, checkpoint=True, labels=labels)
    if trainer.is_global_zero:
        print(f"prequel: {module.model.num_params():,} parameters (a tied embedding counted once), "
              f"{len(tokens):,} tokens, run directory {run_dir}")
    last = run_dir / "checkpoints" / "last.ckpt"
    trainer.fit(module, datamodule, ckpt_path=last if last.exists() else None, weights_only=True)
    if not started.ran:  # killed after the final checkpoint, before the summary: Lightning skips the
        for callback in callbacks:  # finished loop and the hooks that restore the sums and close the stream
            callback.on_train_start(trainer, module)
            callback.on_train_end(trainer, module)
    _save_final_checkpoint(trainer, last)

    totals = code_length.totals()
    if not trainer.is_global_zero:
        return {}
    summary = code_length_summary(totals, tokenizer.vocab_size, _covered_bytes(tokenizer, tape, datamodule, totals))
    summary["train/loss"] = float(trainer.callback_metrics.get("train/loss", float("nan")))
    summary["train/bpb"] = float(trainer.callback_metrics.get("train/bpb", float("nan")))
    summary["model/params"] = module.model.num_params()
    if config.stream.enabled:
        path = run_dir / STREAM_NAME
        complete = totals["complete"]
        file_bytes = stream.save(path, {
            "data_sha256": hashlib.sha256(data).hexdigest() if complete else None,
            "ideal_bits": totals["data_bits"],
        })
        summary.update({
            "code/stream_bits": stream.stream.payload_bits,
            "code/stream_total_bits": summary["code/model_bits"] + stream.stream.payload_bits,
            "code/stream_total_bpb": (summary["code/model_bits"] + stream.stream.payload_bits) / max(summary["data/bytes"], 1),
            "stream/segments": len(stream.stream.segments), "stream/path": str(path), "stream/file_bytes": file_bytes,
        })
    # The per-step first-pass curve, for plots across runs (a size sweep) without W&B.
    curve = "".join(f"{seen},{bits!r},{n}\n" for seen, bits, n in code_length.curve)
    write_atomic(run_dir / "curve.csv", ("tokens_seen,bits,tokens\n" + curve).encode())
    if config.logging.plot:
        plot = plot_loss_curve(code_length.curve, summary, run_dir / "loss_curve.png")
        summary["plot/loss_curve"] = str(plot)
    _log_summary(loggers, summary)
    write_atomic(run_dir / SUMMARY_NAME, json.dumps(summary, indent=2).encode())
    print(format_table(summary))
    print(f"final train/loss {summary['train/loss']:.4f} nats/token, train/bpb {summary['train/bpb']:.4f}; "
          f"code length {summary['code/bpb']:.4f} bpb")
    print(f"run directory: {run_dir}")
    return summary


def _save_final_checkpoint(trainer: L.Trainer, path: Path) -> None:
    """last.ckpt = the weights training ended with (periodic saves may predate the end). Atomic:
    the trainer writes through `AtomicCheckpointIO`, on global rank 0 only."""
    trainer.save_checkpoint(path, weights_only=False)  # with callback states: a resumable checkpoint


def _covered_bytes(tokenizer, tape: Tape, datamodule: PrequelDataModule, totals: dict) -> bytes:
    """The bytes the code covers, in file order (all of them after a full first pass)."""
    if totals["complete"]:
        return tokenizer.decode(tape.tokens)
    done, spans = 0, []
    for batch in datamodule.batches:
        if done >= totals["tokens"]:
            break
        spans.append(batch)
        done += int(batch[:, 1].sum())
    spans = torch.cat(spans)
    spans = spans[spans[:, 0].argsort()]
    return b"".join(tokenizer.decode(tape.tokens[s : s + n]) for s, n in spans.tolist())


def _log_summary(loggers: list, summary: dict) -> None:
    for logger in loggers:
        if isinstance(logger, L.pytorch.loggers.WandbLogger):
            import wandb  # only with W&B on: importing it costs seconds

            run = logger.experiment
            run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
            if "plot/loss_curve" in summary:
                run.log({"plot/loss_curve": wandb.Image(summary["plot/loss_curve"])})
            logger.finalize("success")
            wandb.finish()
        else:
            logger.finalize("success")


def find_stream(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / STREAM_NAME
    if not path.is_file():
        raise StreamError(f"no stream at {path} (give a run directory or a {STREAM_NAME} file)")
    return path


def verify(path: Path, out: Path | None = None, allow_env_mismatch: bool = False, threads: int | None = None) -> dict:
    """Bob: rebuild f from the stream header, replay training while decoding, check everything."""
    stream_path = find_stream(path)
    stream = read_stream(stream_path)
    header = TrainingHeader.from_dict(stream.header)
    config, labels = header.program(), header.labels()
    if header.code_hash != code_hash():
        raise StreamError("the stream was written by different prequel source code (code hash differs); "
                          "check out the commit that wrote it")
    config = replace(
        config, run_dir=None,
        trainer=replace(config.trainer, num_threads=threads or config.trainer.num_threads),
        logging=replace(config.logging, wandb=False, csv=False, plot=False),
    )
    try:
        require_device(header.environment)  # before the config's accelerator is used
        _set_determinism(config)
        diffs = check_environment(header.environment, config.trainer.kernels, config.trainer.accelerator,
                                  allow_env_mismatch, error=StreamError)
    except KernelError as e:
        raise StreamError(str(e)) from None
    tokenizer, n_tokens = header.tokenizer(), header.data_tokens
    try:
        tape = Tape(torch.zeros(n_tokens, dtype=torch.long), bos_id=tokenizer.vocab_size, nbytes_per_id=tokenizer.nbytes_per_id())
    except (RuntimeError, MemoryError):
        raise StreamError(f"the header claims {n_tokens:,} tokens: more than this machine can hold") from None
    code_length = CodeLength(program_bits(dump_yaml(config), tokenizer.serialize(), order_bits(labels)), n_tokens)
    decoder = StreamDecoder(tape, config.stream.checksum_every, config.stream.procedure, stream=stream)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        module, datamodule, trainer = _build(config, tape, tokenizer.vocab_size, [code_length, decoder], [], Path(tmp),
                                             checkpoint=False, labels=labels)
        try:
            trainer.fit(module, datamodule)
        except StreamError as e:
            if diffs:  # the user accepted a different environment: name the likely cause of the drift
                raise StreamError(f"{e} (the environment differs from the encoder's: {'; '.join(diffs)})") from None
            raise
    seconds = time.perf_counter() - started
    decoded = tokenizer.decode(tape.tokens)
    expected_sha = stream.trailer.get("data_sha256")
    if expected_sha is not None and hashlib.sha256(decoded).hexdigest() != expected_sha:
        raise StreamError("decoded bytes do not match the original's sha256")
    weights_checked = _compare_checkpoint(Path(path), module)
    totals = code_length.totals()
    report = {
        "stream": str(stream_path), "tokens": decoder.coded_tokens, "bytes": len(decoded),
        "ideal_bits": totals["data_bits"], "stream_bits": stream.payload_bits,
        "overhead_bits": stream.payload_bits - totals["data_bits"], "sha256": hashlib.sha256(decoded).hexdigest(),
        "complete": expected_sha is not None, "final_weights_equal_checkpoint": weights_checked,
        "environment_differences": diffs, "seconds": seconds,
    }
    if expected_sha is not None:
        out = Path(out) if out else stream_path.with_suffix(".decoded")
        write_atomic(out, decoded)
        report["output"] = str(out)
    return report


def _compare_checkpoint(path: Path, module: PrequelModule) -> bool | None:
    """Final weights bitwise equal to the encoder's final checkpoint, when it sits beside the stream."""
    ckpt = (path if path.is_dir() else path.parent) / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        return None
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    ours = module.state_dict()
    if state.keys() != ours.keys() or not all(torch.equal(state[k], ours[k].cpu()) for k in ours):
        raise StreamError(f"decoded training ended with weights that differ from the encoder's checkpoint {ckpt}")
    return True
