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

import json
import math
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import lightning as L

from prequel.alice.corpus import read_corpus
from prequel.alice.session import train
from prequel.checks.memory import parameter_count
from prequel.checks.settings import (
    ConfigError,
    build_dataclass,
    config_from_dict,
    merge_values,
    mixture_members,
    parse_overrides,
    read_yaml_mapping,
)
from prequel.reports.comparison import RUN_INFO, log_to_wandb, write_comparison
from prequel.resources import CONFIGS, config_path


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
    if (
        not isinstance(sizes, (list, tuple))
        or not sizes
        or not all(isinstance(s, str) and s for s in sizes)
        or len(set(sizes)) != len(sizes)
    ):
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


def preset_path(size: str) -> Path:
    return config_path(size) if size.endswith(".yaml") else CONFIGS / "sizes" / f"{size}.yaml"


def _run_config(sweep: Sweep, name: str, layers: list[dict], sweep_dir: Path, data_path: str | None, where: str):
    """The base config, then each of `layers` in turn; the sweep sets the name, where, what data
    and the W&B group. Errors name `where` the run came from."""
    values = read_yaml_mapping(config_path(sweep.base), "base config")
    for layer in layers:
        values = merge_values(values, layer)
    values = merge_values(
        values,
        {
            "name": name,
            "run_dir": str(sweep_dir / name),
            "data": {"path": data_path},
            "logging": {"wandb_group": sweep.group or sweep_dir.name},
        },
    )
    try:
        return config_from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def mixture_config(sweep: Sweep, configs: list, overrides: dict, sweep_dir: Path, data_path: str | None):
    """The base config with every size as a member (its layers, heads, width and learning rate)."""
    members = ", ".join(f"{c.model.n_layer}x{c.model.n_head}x{c.model.n_embd}@{c.optim.lr!r}" for c in configs)
    return _run_config(
        sweep,
        f"mixture-{sweep.mixture}",
        [overrides, {"mixture": {"members": members, "weights": sweep.mixture}}],
        sweep_dir,
        data_path,
        f"mixture of {', '.join(sweep.sizes)}",
    )


def size_config(sweep: Sweep, size: str, overrides: dict, sweep_dir: Path, data_path: str | None):
    """base config, then the size preset, then the command line; the sweep sets where and what data."""
    preset = read_yaml_mapping(preset_path(size), f"size preset {size!r}")
    for key in ("name", "run_dir"):
        if key in preset:
            raise ConfigError(f"{preset_path(size)}: {key} is set by the sweep, remove it from the preset")
    if "path" in (preset.get("data") or {}):
        raise ConfigError(f"{preset_path(size)}: data.path would give this size other data; set it in the base config")
    return _run_config(
        sweep,
        Path(size).stem,
        [preset, overrides],
        sweep_dir,
        data_path,
        f"size {size} ({preset_path(size)} on {sweep.base})",
    )


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
        text += (
            f"; wall clock: each run stops after {sweep.budget.seconds:g} s of training, so a run with "
            "complete = no covers only part of the data (compare bpb, not bits)"
        )
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
    base_values = merge_values(read_yaml_mapping(config_path(sweep.base), "base config"), overrides)
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
    params = [
        sum(parameter_count(m, c.data.vocab_size) for m, _ in mixture_members(c) or [(c.model, 0)]) for c in configs
    ]  # for the ETA
    budget = budget_text(sweep, len(data), corpus or "tinyshakespeare")
    print(f"compare: {len(configs)} sizes into {sweep_dir}; budget: {budget}", flush=True)
    started, done = time.perf_counter(), []
    for k, (config, n) in enumerate(zip(configs, params)):
        clock = WallClock(sweep.budget.seconds)
        print(
            f"[compare {k + 1}/{len(configs)}] {config.name} ({n:,} params): elapsed "
            f"{_clock(time.perf_counter() - started)}, ETA {_eta(done, params[k:], clock.seconds)}",
            flush=True,
        )
        summary = train(config, extra_callbacks=[clock])
        info_path = Path(config.run_dir) / RUN_INFO
        if clock.steps:  # trained now (not read from an earlier, finished run)
            info_path.write_text(
                json.dumps(
                    {
                        "size": config.name,
                        "train_seconds": clock.elapsed,
                        "steps": clock.steps,
                        "stopped_by_clock": clock.stopped,
                        "budget": budget,
                    },
                    indent=2,
                )
            )
        seconds = json.loads(info_path.read_text())["train_seconds"] if info_path.exists() else clock.elapsed
        done.append((summary["model/params"], seconds))
        print(
            f"[compare {k + 1}/{len(configs)}] {config.name} done: {seconds:.1f} s of training, "
            f"{summary['code/bpb']:.4f} bpb; elapsed {_clock(time.perf_counter() - started)}, "
            f"ETA {_eta(done, params[k + 1 :], clock.seconds)}",
            flush=True,
        )
    paths = write_comparison([Path(c.run_dir) for c in configs], sweep_dir)
    if configs[0].logging.wandb and configs[0].logging.wandb_mode != "disabled":
        log_to_wandb(configs[0].logging, sweep.group or sweep_dir.name, sweep_dir, paths)
    return sweep_dir


def from_command_line(sweep_yaml: str | None, from_runs: list[str] | None, overrides: list[str]) -> int:
    """`prequel compare` (prequel/cli/commands.py parses its flags): a sweep from the YAML at `sweep_yaml` and the
    --KEY VALUE `overrides` (sweep keys, or run settings for every size); or, with `from_runs`, the
    comparison of those finished runs."""
    tree = parse_overrides(overrides)
    sweep_keys = [f.name for f in fields(Sweep)]
    if from_runs:
        extra = sorted(set(tree) - {"sweep_dir"})
        if extra:
            raise ConfigError(f"--from-runs reads finished runs and takes only --sweep_dir, got --{extra[0]}")
        write_comparison(
            [Path(d) for d in from_runs],
            Path(tree.get("sweep_dir") or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}"),
        )
        return 0
    values = read_yaml_mapping(config_path(sweep_yaml), "sweep config") if sweep_yaml else {}
    where = sweep_yaml or "command line"
    sweep = parse_sweep(merge_values(values, {k: v for k, v in tree.items() if k in sweep_keys}), where)
    run_sweep(sweep, {k: v for k, v in tree.items() if k not in sweep_keys})
    return 0
