"""A training run as a user sees it: Alice's training (prequel/alice/fit.py) plus what she reports.

Nothing here is part of f: the summary, its table and plot, curve.csv and the loggers change no
bit of training, so editing them neither changes |f| nor invalidates a stream.
"""

import json
import time
from pathlib import Path

import lightning as L
import torch

from prequel.alice.fit import Fitted, check_run_dir, fit
from prequel.alice.shards import open_corpus
from prequel.checks.settings import Config, to_dict
from prequel.files import write_atomic
from prequel.models.mixture import Mixture
from prequel.reports.summary import code_length_summary, format_table, plot_loss_curve

SUMMARY_NAME = "summary.json"


def train(config: Config, extra_callbacks: list | None = None) -> dict:
    """Train with the prequential code length (and stream) on; returns the summary.
    `extra_callbacks` watch or stop training (a size sweep's wall-clock budget); they change no bit of it."""
    corpus = open_corpus(config.data.path)  # a missing or empty file fails before anything is created
    run_dir = Path(config.run_dir or f"runs/{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_run_dir(run_dir, config, corpus.sha256())  # a finished run of other settings or data is not this one
    if (run_dir / SUMMARY_NAME).exists():
        print(f"{run_dir} already finished; not training again. Summary: {run_dir / SUMMARY_NAME}")
        return json.loads((run_dir / SUMMARY_NAME).read_text())
    loggers = _loggers(config, run_dir)
    fitted = fit(config, run_dir, loggers, extra_callbacks, corpus)
    if not fitted.trainer.is_global_zero:
        return {}
    return report(fitted, loggers)


def _loggers(config: Config, run_dir: Path) -> list:
    loggers = []
    if config.logging.csv:
        loggers.append(L.pytorch.loggers.CSVLogger(run_dir, name="csv", version=""))
    if config.logging.wandb and config.logging.wandb_mode != "disabled":
        loggers.append(
            L.pytorch.loggers.WandbLogger(
                project=config.logging.wandb_project,
                name=run_dir.name,
                save_dir=str(run_dir),
                mode=config.logging.wandb_mode,
                config=to_dict(config),
                group=config.logging.wandb_group,
            )
        )
    return loggers


def report(run: Fitted, loggers: list) -> dict:
    """summary.json, curve.csv, the loss plot, the W&B summary and the printed table."""
    totals, config, run_dir = run.code_length.totals(), run.config, run.run_dir
    summary = code_length_summary(totals, run.tokenizer.vocab_size, _covered_bytes(run, totals))
    summary["train/loss"] = float(run.trainer.callback_metrics.get("train/loss", float("nan")))
    summary["train/bpb"] = float(run.trainer.callback_metrics.get("train/bpb", float("nan")))
    summary["model/params"] = run.module.model.num_params()
    if isinstance(run.module.model, Mixture):  # each member's own Σ, and its size
        summary["mixture/member_bits"] = run.module.model.member_bits.tolist()
        summary["mixture/member_params"] = [m.num_params() for m in run.module.model.members]
    if run.stream is not None:
        payload = run.stream.stream.payload_bits
        summary.update(
            {
                "code/stream_bits": payload,
                "code/stream_total_bits": summary["code/f_bits"] + payload,
                "code/stream_total_bpb": (summary["code/f_bits"] + payload) / max(summary["data/bytes"], 1),
                "stream/segments": len(run.stream.stream.segments),
                "stream/padding_bits": run.stream.stream.padding_bits,  # the lanes' final states: at most this
                "stream/path": str(run.stream_path),
                "stream/file_bytes": run.stream_path.stat().st_size,
            }
        )
    # The per-step first-pass curve, for plots across runs (a size sweep) without W&B.
    curve = "".join(f"{seen},{bits!r},{n}\n" for seen, bits, n in run.code_length.curve)
    write_atomic(run_dir / "curve.csv", ("tokens_seen,bits,tokens\n" + curve).encode())
    if config.logging.plot:
        plot = plot_loss_curve(run.code_length.curve, summary, run_dir / "loss_curve.png")
        summary["plot/loss_curve"] = str(plot)
    _log_summary(loggers, summary)
    write_atomic(run_dir / SUMMARY_NAME, json.dumps(summary, indent=2).encode())
    print(format_table(summary))
    print(
        f"final train/loss {summary['train/loss']:.4f} nats/token, train/bpb {summary['train/bpb']:.4f}; "
        f"code length {summary['code/bpb']:.4f} bpb"
    )
    print(f"run directory: {run_dir}")
    return summary


def _covered_bytes(run: Fitted, totals: dict):
    """The bytes the code covers, in file order (all of them after a full first pass), a piece at a time."""
    if totals["complete"]:
        return run.tape.decoded(run.tokenizer)
    done, spans = 0, []
    for batch in run.datamodule.batches:
        if done >= totals["tokens"]:
            break
        spans.append(batch)
        done += int(batch[:, 1].sum())
    spans = torch.cat(spans)
    return run.tape.decoded(run.tokenizer, spans[spans[:, 0].argsort()])


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
