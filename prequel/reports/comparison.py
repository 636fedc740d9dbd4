"""The comparison of finished runs: one table row per size, with the loss curves and code length
against parameters, beside gzip/bzip2/xz and the uniform code (`prequel compare`, prequel/reports/sweep.py).

`write_comparison` reads each run's own files (summary.json, curve.csv, and compare_run.json when
the sweep trained it), so it works on runs trained earlier or elsewhere (`--from-runs`).
"""

import csv
import json
import math
from pathlib import Path

from prequel.alice.session import SUMMARY_NAME
from prequel.checks.settings import ConfigError
from prequel.reports.prefix import (
    PREFIX_COLUMNS,
    catch_up_text,
    catch_ups,
    plot_cumulative,
    prefix_markdown,
    prefix_rows,
)
from prequel.reports.summary import pyplot, save_loss_axes

RUN_INFO = "compare_run.json"  # what the sweep knows about a run that the run does not: budget, time
BASELINES = (
    ("gzip -9", "baseline/gzip_bpb"),
    ("bzip2 -9", "baseline/bzip2_bpb"),
    ("xz -9e", "baseline/xz_bpb"),
    ("uniform S0", "code/uniform_bpb"),
)
COLUMNS = (
    "size",
    "params",
    "tokens",
    "bytes",
    "complete",
    "train_s",
    "tokens_per_s",
    "f_bits",
    "sigma_bits",
    "n_bits",
    "total_bits",
    "bpb",
    "stream_total_bpb",
    "last_epoch_bpb",
)


def read_run(run_dir: Path) -> dict:
    """One table row and the loss curve of a finished run, from its own files."""
    run_dir = Path(run_dir)
    if not (run_dir / SUMMARY_NAME).is_file():
        raise ConfigError(f"{run_dir}: no {SUMMARY_NAME} (not a finished run; train it, or leave it out)")
    s = json.loads((run_dir / SUMMARY_NAME).read_text())
    info = json.loads((run_dir / RUN_INFO).read_text()) if (run_dir / RUN_INFO).is_file() else {}
    # Without the sweep's timer: config.yaml is written just before training, summary.json just after.
    seconds = (
        info.get("train_seconds")
        or (run_dir / SUMMARY_NAME).stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime
    )
    row = {
        "size": info.get("size", run_dir.name),
        "params": s["model/params"],
        "tokens": s["data/tokens"],
        "bytes": s["data/bytes"],
        "complete": s["data/complete"],
        "train_s": seconds,
        "tokens_per_s": s["data/tokens"] / max(seconds, 1e-9),
        "f_bits": s["code/f_bits"],
        "sigma_bits": s["code/data_bits"],
        "n_bits": s["code/n_bits"],
        "total_bits": s["code/total_bits"],
        "bpb": s["code/bpb"],
        "stream_total_bpb": s.get("code/stream_total_bpb"),
        "last_epoch_bpb": s["train/last_epoch_bpb"],
    }
    curve = None  # (tokens seen, bits, tokens) of each first-pass step, as prequel.alice.fit saved it
    if (run_dir / "curve.csv").is_file():
        with open(run_dir / "curve.csv") as f:
            curve = [(int(r["tokens_seen"]), float(r["bits"]), int(r["tokens"])) for r in csv.DictReader(f)]
    return {
        "row": row,
        "summary": s,
        "budget": info.get("budget"),
        "curve": curve,
        "mixture": "mixture/member_bits" in s,
    }


def write_comparison(run_dirs: list[Path], out_dir: Path) -> dict[str, Path]:
    """comparison.md, comparison.csv, loss_curves.png and code_vs_params.png in `out_dir`."""
    runs = [read_run(d) for d in run_dirs]
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r["row"] for r in runs]
    same_bytes = len({r["bytes"] for r in rows}) == 1
    baselines = []  # of the same bytes: one set when all runs cover the same bytes, else one per run
    for r in runs if not same_bytes else runs[:1]:
        for label, key in BASELINES:
            name = label if same_bytes else f"{label} (bytes of {r['row']['size']})"
            baselines.append(
                {
                    "size": name,
                    "bytes": r["row"]["bytes"],
                    "total_bits": r["summary"][key] * r["row"]["bytes"],
                    "bpb": r["summary"][key],
                }
            )
    with open(out_dir / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(
            [
                {k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in r.items()}
                for r in rows + baselines
            ]
        )
    prefixes, points = prefix_rows(runs), catch_ups(runs)
    with open(out_dir / "prefixes.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, PREFIX_COLUMNS)
        writer.writeheader()
        writer.writerows([{k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in prefixes])
    budgets = sorted({r["budget"] for r in runs if r["budget"]})
    budget = "; ".join(budgets) or "as each run was trained (runs read from disk): see the tokens and complete columns"
    bytes_per_token = rows[0]["bytes"] / max(rows[0]["tokens"], 1)
    prefix_md = prefix_markdown(prefixes, points, bytes_per_token) if prefixes else ""
    (out_dir / "comparison.md").write_text(
        markdown_table(rows, baselines, budget) + mixture_text(runs) + "\n" + prefix_md
    )
    paths = {
        "md": out_dir / "comparison.md",
        "csv": out_dir / "comparison.csv",
        "prefixes": out_dir / "prefixes.csv",
        "curves": plot_curves(runs, out_dir / "loss_curves.png"),
        "sizes": plot_sizes(rows, baselines if same_bytes else [], out_dir / "code_vs_params.png"),
    }
    if prefixes:
        paths["cumulative"] = plot_cumulative(runs, points, out_dir / "cumulative_code.png")
    (out_dir / "catch_up.json").write_text(
        json.dumps([p | {"text": catch_up_text(p, bytes_per_token)} for p in points], indent=2)
    )
    print((out_dir / "comparison.md").read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return paths


def mixture_text(runs: list[dict]) -> str:
    """Each mixture against the best single size of the same data, and against its own members."""
    lines = []
    sizes = [r for r in runs if not r["mixture"]]
    for run in (r for r in runs if r["mixture"]):
        mix, members = run["row"], run["summary"]["mixture/member_bits"]
        line = (
            f"\n{mix['size']}: Σ {mix['sigma_bits']:,.0f} bits for {len(members)} members trained side by side; "
            f"its members alone: {', '.join(f'{b:,.0f}' for b in members)}; the bound min + log2 K = "
            f"{min(members) + math.log2(len(members)):,.0f}."
        )
        same = [r["row"] for r in sizes if r["row"]["bytes"] == mix["bytes"]]
        if same:
            best = min(same, key=lambda r: r["sigma_bits"])
            line += (
                f" Best single size: {best['size']} ({best['sigma_bits']:,.0f}): the mixture is "
                f"{mix['sigma_bits'] - best['sigma_bits']:+,.0f} bits from it."
            )
        lines.append(line)
    return "".join(lines) + ("\n" if lines else "")


def log_to_wandb(logging, group: str, out_dir: Path, paths: dict[str, Path]) -> None:
    """The comparison as one more run in the sizes' W&B group: its plots, and the prefix table
    (one row per size and prefix) as a W&B table; offline by default, `wandb sync` later."""
    import wandb  # only with W&B on: importing it costs seconds

    run = wandb.init(
        project=logging.wandb_project,
        group=group,
        name=f"{group}-comparison",
        dir=str(out_dir),
        mode=logging.wandb_mode,
        job_type="comparison",
        reinit="finish_previous",
    )
    with open(paths["prefixes"]) as f:
        table = list(csv.reader(f))
    run.log(
        {
            "compare/prefixes": wandb.Table(columns=table[0], data=table[1:]),
            **{f"compare/{key}": wandb.Image(str(path)) for key, path in paths.items() if path.suffix == ".png"},
        }
    )
    run.summary["compare/catch_up"] = json.loads((out_dir / "catch_up.json").read_text())
    run.finish()


def markdown_table(rows: list[dict], baselines: list[dict], budget: str) -> str:
    def num(v, fmt=",.0f"):
        return "" if v is None else format(v, fmt)

    head = (
        "| size | params | tokens | complete | train s | tokens/s | \\|f\\| bits | Σ bits | n bits | total bits "
        "| bpb | stream + \\|f\\| bpb | last-epoch CE bpb |"
    )
    lines = [f"**Budget**: {budget}.", "", head, "|---" + "|---:" * 12 + "|"]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['params']:,} | {r['tokens']:,} | {'yes' if r['complete'] else 'no'} "
            f"| {r['train_s']:.1f} | {r['tokens_per_s']:,.0f} | {num(r['f_bits'])} | {num(r['sigma_bits'])} "
            f"| {num(r['n_bits'])} | {num(r['total_bits'])} | {r['bpb']:.4f} "
            f"| {num(r['stream_total_bpb'], '.4f')} | {r['last_epoch_bpb']:.4f} |"
        )
    for b in baselines:
        lines.append(f"| {b['size']} | | | | | | | | | {b['total_bits']:,.0f} | {b['bpb']:.4f} | | |")
    best = min(rows, key=lambda r: r["bpb"])
    lines += ["", f"Shortest code length |f| + n + Σ: **{best['size']}** ({best['bpb']:.4f} bpb)."]
    streams = [r for r in rows if r["stream_total_bpb"] is not None]
    if streams:
        best = min(streams, key=lambda r: r["stream_total_bpb"])
        lines.append(f"Shortest real stream + |f|: **{best['size']}** ({best['stream_total_bpb']:.4f} bpb).")
    lines += [
        "",
        "total = |f| + n + Σ (the formula's bound); stream + |f| = the real arithmetic-coded stream "
        "plus the program, what Alice actually sends. Last-epoch CE is training loss, not a code.",
    ]
    return "\n".join(lines) + "\n"


def _binned(curve: list[tuple[int, float, int]], bins: int = 200) -> tuple[list[int], list[float]]:
    """Steps merged into ~`bins` groups: bits/token per group, so the area under the stairs is still Σ."""
    groups: list[list[float]] = []  # [start, bits, tokens]
    width = max(curve[-1][0] / bins, 1)
    for seen, bits, n in curve:
        start = seen - n
        if not groups or start >= groups[-1][0] + width:
            groups.append([start, 0.0, 0])
        groups[-1][1] += bits
        groups[-1][2] += n
    return [g[0] for g in groups] + [curve[-1][0]], [g[1] / max(g[2], 1) for g in groups]


def plot_curves(runs: list[dict], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for i, r in enumerate(run for run in runs if run["curve"]):
        edges, per_token = _binned(r["curve"])
        color = f"C{i}"
        ax.stairs(per_token, edges, fill=True, alpha=0.12, color=color)
        ax.stairs(
            per_token,
            edges,
            color=color,
            linewidth=1.3,
            label=f"{r['row']['size']} ({r['row']['params']:,} params): Σ = {r['row']['sigma_bits']:,.0f} bits",
        )
    return save_loss_axes(fig, ax, "Prequential loss curves; the shaded area under each is its Σ", path)


def plot_sizes(rows: list[dict], baselines: list[dict], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    params = [r["params"] for r in rows]
    ax.plot(params, [r["bpb"] for r in rows], "o-", color="C0", label="code length |f| + n + Σ")
    if all(r["stream_total_bpb"] is not None for r in rows):
        ax.plot(params, [r["stream_total_bpb"] for r in rows], "s--", color="C1", label="real stream + |f|")
    ax.plot(
        params, [r["sigma_bits"] / r["bytes"] for r in rows], "^:", color="C2", label="Σ only (area under the curve)"
    )
    for r in rows:
        ax.annotate(r["size"], (r["params"], r["bpb"]), textcoords="offset points", xytext=(4, 6))
    for b, style in zip(baselines, ("-.", "--", ":", "-")):
        ax.axhline(b["bpb"], color="gray", linestyle=style, linewidth=1, label=f"{b['size']} ({b['bpb']:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("bits per byte")
    ax.set_title("Code length vs model size, same bytes" if baselines else "Code length vs model size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
