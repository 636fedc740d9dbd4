"""Size sweep: train each size on the same data, then compare code lengths with gzip/bzip2/xz.

    prequel compare --config configs/compare.yaml [--budget.bytes 100000] [--trainer.num_threads 2]
    prequel compare --from-runs runs/a runs/b [--sweep_dir DIR]

A bigger model reaches a lower loss, but it also learns more slowly at first, and the early part
of the curve dominates the area Σ on a small corpus. The sweep shows where the optimum lies for
one corpus and budget. Budgets:

* bytes: every size codes the first N bytes of the corpus once, in the same order. The totals
  are directly comparable (same bytes, same baselines).
* seconds: each run stops after this much training time (`WallClock`). A run stopped early covers
  only part of the data (`data/complete: false`); compare its bpb, not its bits. The stop step is
  not part of f, so `verify` cannot replay such a stream; re-run that size with
  `--trainer.max_steps` = the `steps` in its compare_run.json for a verifiable one (the same bits
  under a constant schedule; a cosine schedule is stretched over max_steps, so it changes).
"""

import csv
import json
import math
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import lightning as L

from prequel.checks.settings import (
    ConfigError,
    build_dataclass,
    config_from_dict,
    merge_values,
    mixture_members,
    parameter_count,
    parse_overrides,
    read_yaml_mapping,
)
from prequel.alice.corpus import read_corpus
from prequel.reports.prefix import PREFIX_COLUMNS, catch_up_text, catch_ups, plot_cumulative, prefix_markdown, prefix_rows
from prequel.reports.summary import pyplot, save_loss_axes
from prequel.resources import CONFIGS, shipped
from prequel.alice.session import SUMMARY_NAME, train

RUN_INFO = "compare_run.json"  # what the sweep knows about a run that the run does not: budget, time
BASELINES = (("gzip -9", "baseline/gzip_bpb"), ("bzip2 -9", "baseline/bzip2_bpb"), ("xz -9e", "baseline/xz_bpb"),
             ("uniform S0", "code/uniform_bpb"))
COLUMNS = ("size", "params", "tokens", "bytes", "complete", "train_s", "tokens_per_s", "f_bits", "sigma_bits",
           "n_bits", "total_bits", "bpb", "stream_total_bpb", "last_epoch_bpb")


@dataclass
class Budget:
    bytes: int | None = None  # every size codes the first N bytes of the corpus; None = all of it
    seconds: float | None = None  # stop each run after this much training time; None = no clock limit


@dataclass
class Sweep:
    base: str = "configs/small.yaml"  # the config every size starts from
    sizes: tuple[str, ...] = ("nano", "micro", "small", "medium")  # configs/sizes/<name>.yaml, or paths
    budget: Budget = field(default_factory=Budget)
    # after the sizes, also train all of them side by side as one mixture (models/mixture.py): bayes or
    # switch; None = no mixture run
    mixture: str | None = None
    group: str | None = None  # W&B group; None = the sweep directory's name
    sweep_dir: str | None = None  # None = runs/compare-<timestamp>


def parse_sweep(values: dict, where: str) -> Sweep:
    """A sweep spec from its YAML mapping (+ overrides), checked like a run config."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping with base, sizes, budget, got {values!r}")
    values = dict(values)
    sizes = values.pop("sizes", Sweep.sizes)
    sizes = [s.strip() for s in sizes.split(",")] if isinstance(sizes, str) else sizes
    if not isinstance(sizes, (list, tuple)) or not sizes or not all(isinstance(s, str) and s for s in sizes) \
            or len(set(sizes)) != len(sizes):
        raise ConfigError(f"{where}: sizes: expected distinct preset names (e.g. [nano, small]), got {sizes!r}")
    try:
        sweep = build_dataclass(Sweep, values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if sweep.mixture not in (None, "bayes", "switch"):
        raise ConfigError(f"{where}: mixture: expected bayes, switch or null, got {sweep.mixture!r}")
    for key, value in vars(sweep.budget).items():
        if value is not None and value <= 0:
            raise ConfigError(f"{where}: budget.{key}: must be > 0 or null, got {value!r}")
    return replace(sweep, sizes=tuple(sizes))


def _path(name: str) -> Path:
    """A path as given, else a shipped one (``configs/small.yaml``: the sweep runs from any directory)."""
    return Path(name) if Path(name).exists() or not name.startswith("configs/") else shipped(*Path(name).parts)


def preset_path(size: str) -> Path:
    return _path(size) if size.endswith(".yaml") else CONFIGS / "sizes" / f"{size}.yaml"


def _run_config(sweep: Sweep, name: str, layers: list[dict], sweep_dir: Path, data_path: str | None, where: str):
    """The base config, then each of `layers` in turn; the sweep sets the name, where, what data
    and the W&B group. Errors name `where` the run came from."""
    values = read_yaml_mapping(_path(sweep.base), "base config")
    for layer in layers:
        values = merge_values(values, layer)
    values = merge_values(values, {"name": name, "run_dir": str(sweep_dir / name), "data": {"path": data_path},
                                   "logging": {"wandb_group": sweep.group or sweep_dir.name}})
    try:
        return config_from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def mixture_config(sweep: Sweep, configs: list, overrides: dict, sweep_dir: Path, data_path: str | None):
    """The base config with every size as a member (its layers, heads, width and learning rate)."""
    members = ", ".join(f"{c.model.n_layer}x{c.model.n_head}x{c.model.n_embd}@{c.optim.lr!r}" for c in configs)
    return _run_config(sweep, f"mixture-{sweep.mixture}", [overrides, {
        "mixture": {"members": members, "weights": sweep.mixture}}], sweep_dir, data_path,
        f"mixture of {', '.join(sweep.sizes)}")


def size_config(sweep: Sweep, size: str, overrides: dict, sweep_dir: Path, data_path: str | None):
    """base config, then the size preset, then the command line; the sweep sets where and what data."""
    preset = read_yaml_mapping(preset_path(size), f"size preset {size!r}")
    for key in ("name", "run_dir"):
        if key in preset:
            raise ConfigError(f"{preset_path(size)}: {key} is set by the sweep, remove it from the preset")
    if "path" in (preset.get("data") or {}):
        raise ConfigError(f"{preset_path(size)}: data.path would give this size other data; set it in the base config")
    return _run_config(sweep, Path(size).stem, [preset, overrides], sweep_dir, data_path,
                       f"size {size} ({preset_path(size)} on {sweep.base})")


class WallClock(L.Callback):
    """Times training and, with a budget, stops it once `seconds` of training have passed.
    Stopping changes where the code ends, never a bit of what was coded before."""

    def __init__(self, seconds: float | None = None):
        self.seconds, self.elapsed, self.stopped, self.steps = seconds, 0.0, False, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.elapsed = time.perf_counter() - self._start
        if self.seconds is not None and self.elapsed >= self.seconds and not trainer.should_stop:
            trainer.should_stop, self.stopped = True, True

    def on_train_end(self, trainer, pl_module) -> None:
        self.elapsed, self.steps = time.perf_counter() - self._start, trainer.global_step


def budget_text(sweep: Sweep, nbytes: int, corpus: str) -> str:
    which = "all" if sweep.budget.bytes is None else "the first"
    text = f"same data: every size codes {which} {nbytes:,} bytes of {corpus} once, in the same order"
    if sweep.budget.seconds is not None:
        text += (f"; wall clock: each run stops after {sweep.budget.seconds:g} s of training, so a run with "
                 "complete = no covers only part of the data (compare bpb, not bits)")
    return text


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _eta(done: list[tuple[int, float]], todo: list[int], seconds: float | None) -> str:
    """Remaining time from the runs done so far: time grows ~ params^0.8 (overheads dominate tiny models)."""
    if not todo:
        return "0:00"
    if not done:
        return f"<= {_clock(seconds * len(todo))} (clock budget)" if seconds else "known after the first run"
    (p0, t0), (p1, t1) = done[-2] if len(done) > 1 else done[-1], done[-1]
    slope = min(max(math.log(t1 / t0) / math.log(p1 / p0), 0.3), 1.2) if p1 != p0 and t0 > 0 and t1 > 0 else 0.8
    left = sum(t1 * (p / p1) ** slope for p in todo)
    return f"~{_clock(min(left, seconds * len(todo)) if seconds else left)}"


def run_sweep(sweep: Sweep, overrides: dict) -> Path:
    """Train every size (a finished run is read, not retrained), then write the comparison."""
    for key in ("name", "run_dir"):
        if key in overrides:
            raise ConfigError(f"--{key} is set per size by the sweep; use --sweep_dir")
    sweep_dir = Path(sweep.sweep_dir or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    base_values = merge_values(read_yaml_mapping(_path(sweep.base), "base config"), overrides)
    corpus = (base_values.get("data") or {}).get("path")
    data = read_corpus(corpus)
    data_path = corpus if sweep.budget.bytes is None else str(sweep_dir / f"corpus-{sweep.budget.bytes}.bin")
    configs = [size_config(sweep, size, overrides, sweep_dir, data_path) for size in sweep.sizes]  # all errors first
    if sweep.mixture:
        configs.append(mixture_config(sweep, configs, overrides, sweep_dir, data_path))
    if sweep.budget.bytes is not None:  # one file of the first N bytes: every size codes exactly these
        sweep_dir.mkdir(parents=True, exist_ok=True)
        data = data[: sweep.budget.bytes]
        Path(data_path).write_bytes(data)
    params = [sum(parameter_count(m, c.data.vocab_size) for m, _ in mixture_members(c) or [(c.model, 0)])
              for c in configs]  # for the ETA
    budget = budget_text(sweep, len(data), corpus or "tinyshakespeare")
    print(f"compare: {len(configs)} sizes into {sweep_dir}; budget: {budget}", flush=True)
    started, done = time.perf_counter(), []
    for k, (config, n) in enumerate(zip(configs, params)):
        clock = WallClock(sweep.budget.seconds)
        print(f"[compare {k + 1}/{len(configs)}] {config.name} ({n:,} params): elapsed "
              f"{_clock(time.perf_counter() - started)}, ETA {_eta(done, params[k:], clock.seconds)}", flush=True)
        summary = train(config, extra_callbacks=[clock])
        info_path = Path(config.run_dir) / RUN_INFO
        if clock.steps:  # trained now (not read from an earlier, finished run)
            info_path.write_text(json.dumps({"size": config.name, "train_seconds": clock.elapsed, "steps": clock.steps,
                                             "stopped_by_clock": clock.stopped, "budget": budget}, indent=2))
        seconds = json.loads(info_path.read_text())["train_seconds"] if info_path.exists() else clock.elapsed
        done.append((summary["model/params"], seconds))
        print(f"[compare {k + 1}/{len(configs)}] {config.name} done: {seconds:.1f} s of training, "
              f"{summary['code/bpb']:.4f} bpb; elapsed {_clock(time.perf_counter() - started)}, "
              f"ETA {_eta(done, params[k + 1:], clock.seconds)}", flush=True)
    paths = write_comparison([Path(c.run_dir) for c in configs], sweep_dir)
    if configs[0].logging.wandb and configs[0].logging.wandb_mode != "disabled":
        log_to_wandb(configs[0].logging, sweep.group or sweep_dir.name, sweep_dir, paths)
    return sweep_dir


def read_run(run_dir: Path) -> dict:
    """One table row and the loss curve of a finished run, from its own files."""
    run_dir = Path(run_dir)
    if not (run_dir / SUMMARY_NAME).is_file():
        raise ConfigError(f"{run_dir}: no {SUMMARY_NAME} (not a finished run; train it, or leave it out)")
    s = json.loads((run_dir / SUMMARY_NAME).read_text())
    info = json.loads((run_dir / RUN_INFO).read_text()) if (run_dir / RUN_INFO).is_file() else {}
    # Without the sweep's timer: config.yaml is written just before training, summary.json just after.
    seconds = info.get("train_seconds") or \
        (run_dir / SUMMARY_NAME).stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime
    row = {"size": info.get("size", run_dir.name), "params": s["model/params"], "tokens": s["data/tokens"],
           "bytes": s["data/bytes"], "complete": s["data/complete"], "train_s": seconds,
           "tokens_per_s": s["data/tokens"] / max(seconds, 1e-9), "f_bits": s["code/f_bits"],
           "sigma_bits": s["code/data_bits"], "n_bits": s["code/n_bits"], "total_bits": s["code/total_bits"],
           "bpb": s["code/bpb"], "stream_total_bpb": s.get("code/stream_total_bpb"),
           "last_epoch_bpb": s["train/last_epoch_bpb"]}
    curve = None  # (tokens seen, bits, tokens) of each first-pass step, as prequel.alice.fit saved it
    if (run_dir / "curve.csv").is_file():
        with open(run_dir / "curve.csv") as f:
            curve = [(int(r["tokens_seen"]), float(r["bits"]), int(r["tokens"])) for r in csv.DictReader(f)]
    return {"row": row, "summary": s, "budget": info.get("budget"), "curve": curve,
            "mixture": "mixture/member_bits" in s}


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
            baselines.append({"size": name, "bytes": r["row"]["bytes"],
                              "total_bits": r["summary"][key] * r["row"]["bytes"], "bpb": r["summary"][key]})
    with open(out_dir / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows([{k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in r.items()}
                          for r in rows + baselines])
    prefixes, points = prefix_rows(runs), catch_ups(runs)
    with open(out_dir / "prefixes.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, PREFIX_COLUMNS)
        writer.writeheader()
        writer.writerows([{k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in prefixes])
    budgets = sorted({r["budget"] for r in runs if r["budget"]})
    budget = "; ".join(budgets) or "as each run was trained (runs read from disk): see the tokens and complete columns"
    bytes_per_token = rows[0]["bytes"] / max(rows[0]["tokens"], 1)
    prefix_md = prefix_markdown(prefixes, points, bytes_per_token) if prefixes else ""
    (out_dir / "comparison.md").write_text(markdown_table(rows, baselines, budget) + mixture_text(runs) + "\n" + prefix_md)
    paths = {"md": out_dir / "comparison.md", "csv": out_dir / "comparison.csv", "prefixes": out_dir / "prefixes.csv",
             "curves": plot_curves(runs, out_dir / "loss_curves.png"),
             "sizes": plot_sizes(rows, baselines if same_bytes else [], out_dir / "code_vs_params.png")}
    if prefixes:
        paths["cumulative"] = plot_cumulative(runs, points, out_dir / "cumulative_code.png")
    (out_dir / "catch_up.json").write_text(json.dumps(
        [p | {"text": catch_up_text(p, bytes_per_token)} for p in points], indent=2))
    print((out_dir / "comparison.md").read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return paths


def mixture_text(runs: list[dict]) -> str:
    """Each mixture against the best single size of the same data, and against its own members."""
    lines = []
    sizes = [r for r in runs if not r["mixture"]]
    for run in (r for r in runs if r["mixture"]):
        mix, members = run["row"], run["summary"]["mixture/member_bits"]
        line = (f"\n{mix['size']}: Σ {mix['sigma_bits']:,.0f} bits for {len(members)} members trained side by side; "
                f"its members alone: {', '.join(f'{b:,.0f}' for b in members)}; the bound min + log2 K = "
                f"{min(members) + math.log2(len(members)):,.0f}.")
        same = [r["row"] for r in sizes if r["row"]["bytes"] == mix["bytes"]]
        if same:
            best = min(same, key=lambda r: r["sigma_bits"])
            line += (f" Best single size: {best['size']} ({best['sigma_bits']:,.0f}): the mixture is "
                     f"{mix['sigma_bits'] - best['sigma_bits']:+,.0f} bits from it.")
        lines.append(line)
    return "".join(lines) + ("\n" if lines else "")


def log_to_wandb(logging, group: str, out_dir: Path, paths: dict[str, Path]) -> None:
    """The comparison as one more run in the sizes' W&B group: its plots, and the prefix table
    (one row per size and prefix) as a W&B table; offline by default, `wandb sync` later."""
    import wandb  # only with W&B on: importing it costs seconds

    run = wandb.init(project=logging.wandb_project, group=group, name=f"{group}-comparison", dir=str(out_dir),
                     mode=logging.wandb_mode, job_type="comparison", reinit="finish_previous")
    with open(paths["prefixes"]) as f:
        table = list(csv.reader(f))
    run.log({"compare/prefixes": wandb.Table(columns=table[0], data=table[1:]),
             **{f"compare/{key}": wandb.Image(str(path)) for key, path in paths.items() if path.suffix == ".png"}})
    run.summary["compare/catch_up"] = json.loads((out_dir / "catch_up.json").read_text())
    run.finish()


def markdown_table(rows: list[dict], baselines: list[dict], budget: str) -> str:
    def num(v, fmt=",.0f"):
        return "" if v is None else format(v, fmt)

    head = ("| size | params | tokens | complete | train s | tokens/s | \\|f\\| bits | Σ bits | n bits | total bits "
            "| bpb | stream + \\|f\\| bpb | last-epoch CE bpb |")
    lines = [f"**Budget**: {budget}.", "", head, "|---" + "|---:" * 12 + "|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['params']:,} | {r['tokens']:,} | {'yes' if r['complete'] else 'no'} "
                     f"| {r['train_s']:.1f} | {r['tokens_per_s']:,.0f} | {num(r['f_bits'])} | {num(r['sigma_bits'])} "
                     f"| {num(r['n_bits'])} | {num(r['total_bits'])} | {r['bpb']:.4f} "
                     f"| {num(r['stream_total_bpb'], '.4f')} | {r['last_epoch_bpb']:.4f} |")
    for b in baselines:
        lines.append(f"| {b['size']} | | | | | | | | | {b['total_bits']:,.0f} | {b['bpb']:.4f} | | |")
    best = min(rows, key=lambda r: r["bpb"])
    lines += ["", f"Shortest code length |f| + n + Σ: **{best['size']}** ({best['bpb']:.4f} bpb)."]
    streams = [r for r in rows if r["stream_total_bpb"] is not None]
    if streams:
        best = min(streams, key=lambda r: r["stream_total_bpb"])
        lines.append(f"Shortest real stream + |f|: **{best['size']}** ({best['stream_total_bpb']:.4f} bpb).")
    lines += ["", "total = |f| + n + Σ (the formula's bound); stream + |f| = the real arithmetic-coded stream "
              "plus the program, what Alice actually sends. Last-epoch CE is training loss, not a code."]
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
        ax.stairs(per_token, edges, color=color, linewidth=1.3,
                  label=f"{r['row']['size']} ({r['row']['params']:,} params): Σ = {r['row']['sigma_bits']:,.0f} bits")
    return save_loss_axes(fig, ax, "Prequential loss curves; the shaded area under each is its Σ", path)


def plot_sizes(rows: list[dict], baselines: list[dict], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    params = [r["params"] for r in rows]
    ax.plot(params, [r["bpb"] for r in rows], "o-", color="C0", label="code length |f| + n + Σ")
    if all(r["stream_total_bpb"] is not None for r in rows):
        ax.plot(params, [r["stream_total_bpb"] for r in rows], "s--", color="C1", label="real stream + |f|")
    ax.plot(params, [r["sigma_bits"] / r["bytes"] for r in rows], "^:", color="C2",
            label="Σ only (area under the curve)")
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


def from_command_line(config_path: str | None, from_runs: list[str] | None, overrides: list[str]) -> int:
    """`prequel compare` (prequel/cli/commands.py parses its flags): a sweep from the YAML at `config_path` and the
    --KEY VALUE `overrides` (sweep keys, or run settings for every size); or, with `from_runs`, the
    comparison of those finished runs."""
    tree = parse_overrides(overrides)
    sweep_keys = [f.name for f in fields(Sweep)]
    if from_runs:
        extra = sorted(set(tree) - {"sweep_dir"})
        if extra:
            raise ConfigError(f"--from-runs reads finished runs and takes only --sweep_dir, got --{extra[0]}")
        write_comparison([Path(d) for d in from_runs],
                         Path(tree.get("sweep_dir") or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}"))
        return 0
    values = read_yaml_mapping(_path(config_path), "sweep config") if config_path else {}
    where = config_path or "command line"
    sweep = parse_sweep(merge_values(values, {k: v for k, v in tree.items() if k in sweep_keys}), where)
    run_sweep(sweep, {k: v for k, v in tree.items() if k not in sweep_keys})
    return 0
