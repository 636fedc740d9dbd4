"""Code lengths of prefixes, and where a bigger model catches up (issue 19).

The prequential code of the first p tokens is the area under the loss curve up to p: one run per
size gives every prefix, no retraining. A bigger model pays for a slow start and wins later; its
catch-up point is where its cumulative code drops below a smaller model's for good. All of this
reads the per-step curve a run saved (curve.csv: tokens seen, bits, tokens of each first-pass
step), so it works on finished runs.
"""

from pathlib import Path

import numpy as np

from prequel.reports.summary import pyplot

FRACTIONS = (0.01, 0.03, 0.1, 0.3, 1.0)  # of the tokens each run coded
PREFIX_COLUMNS = (
    "size",
    "params",
    "fraction",
    "tokens",
    "bytes",
    "sigma_bits",
    "f_bits",
    "n_bits",
    "total_bits",
    "bpb",
    "shortest",
)


def cumulative(curve: list[tuple[int, float, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, bits) at every step boundary, from (0, 0): the cumulative code of the data part."""
    seen = np.array([0] + [c[0] for c in curve], dtype=np.int64)
    bits = np.concatenate([[0.0], np.cumsum([c[1] for c in curve])])
    return seen, bits


def prefix(curve: list[tuple[int, float, int]], tokens: float) -> tuple[int, float]:
    """The first step boundary at or after `tokens`, and Σ of the steps up to it (a partial sum
    of the curve: the code length of exactly that prefix)."""
    seen, bits = cumulative(curve)
    i = min(int(np.searchsorted(seen, tokens)), len(seen) - 1)
    return int(seen[i]), float(bits[i])


def prefix_rows(runs: list[dict], fractions=FRACTIONS) -> list[dict]:
    """One row per (size, prefix): Σ, |f| + n + Σ and bpb of the first `fraction` of the tokens.
    bytes = tokens × the run's bytes per token (exact for the byte tokenizer)."""
    rows = []
    for fraction in fractions:
        group = []
        for run in runs:
            if not run["curve"]:
                continue
            r = run["row"]
            tokens, sigma = prefix(run["curve"], fraction * run["curve"][-1][0])
            nbytes = round(tokens * r["bytes"] / max(r["tokens"], 1))
            total = r["f_bits"] + tokens + sigma
            group.append(
                {
                    "size": r["size"],
                    "params": r["params"],
                    "fraction": fraction,
                    "tokens": tokens,
                    "bytes": nbytes,
                    "sigma_bits": sigma,
                    "f_bits": r["f_bits"],
                    "n_bits": tokens,
                    "total_bits": total,
                    "bpb": total / max(nbytes, 1),
                    "shortest": False,
                }
            )
        if group:
            min(group, key=lambda g: g["sigma_bits"])["shortest"] = True
        rows += group
    return rows


def catch_up(small: dict, big: dict) -> dict:
    """Where `big`'s cumulative code drops below `small`'s for good, on the union of both runs'
    step boundaries (cumulative bits are linear inside a step). tokens None: never (big is still
    behind at the end, by `behind_bits`), or 0: big is never behind."""
    (s_seen, s_bits), (b_seen, b_bits) = cumulative(small["curve"]), cumulative(big["curve"])
    end = min(s_seen[-1], b_seen[-1])
    grid = np.union1d(s_seen[s_seen <= end], b_seen[b_seen <= end])
    diff = np.interp(grid, b_seen, b_bits) - np.interp(grid, s_seen, s_bits)  # > 0: big is behind
    behind = np.nonzero(diff[1:] > 0)[0] + 1  # grid[0] = 0, where both are 0
    out = {
        "small": small["row"]["size"],
        "big": big["row"]["size"],
        "tokens": None,
        "behind_bits": float(diff[-1]),
        "behind_from": int(grid[behind[0]]) if len(behind) else None,
        "ahead_first": bool(diff[1] < 0),
    }
    if diff[-1] >= 0:
        return out
    if not len(behind):
        out["tokens"] = 0
        return out
    i = behind[-1]  # the last point where big is behind; it crosses before the next one
    t0, t1, d0, d1 = grid[i], grid[i + 1], diff[i], diff[i + 1]
    out["tokens"] = float(t0 + (t1 - t0) * d0 / (d0 - d1))
    return out


def catch_ups(runs: list[dict]) -> list[dict]:
    """Each size against the next smaller one (by parameters)."""
    ordered = sorted((r for r in runs if r["curve"] and not r.get("mixture")), key=lambda r: r["row"]["params"])
    return [catch_up(a, b) for a, b in zip(ordered, ordered[1:])]


def catch_up_text(c: dict, bytes_per_token: float) -> str:
    if c["tokens"] is None:
        return f"{c['big']} never catches up with {c['small']}: still {c['behind_bits']:,.0f} bits behind at the end"
    if c["tokens"] == 0:
        return f"{c['big']} is ahead of {c['small']} from the start"
    early = f" (ahead at first, behind from {c['behind_from']:,} tokens)" if c["ahead_first"] else ""
    return (
        f"{c['big']} catches up with {c['small']} for good at {c['tokens']:,.0f} tokens "
        f"(~{c['tokens'] * bytes_per_token:,.0f} bytes){early}; ahead by {-c['behind_bits']:,.0f} bits at the end"
    )


def prefix_markdown(rows: list[dict], points: list[dict], bytes_per_token: float) -> str:
    fractions = sorted({r["fraction"] for r in rows})
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    at = {(r["size"], r["fraction"]): r for r in rows}
    head = "| size | params | " + " | ".join(f"{f:.0%} of the data" for f in fractions) + " |"
    lines = [
        "Σ bits of each prefix (the area under the loss curve up to it; **bold**: shortest):",
        "",
        head,
        "|---|---:|" + "---:|" * len(fractions),
    ]
    for size in sizes:
        first = next(r for r in rows if r["size"] == size)
        cells = []
        for f in fractions:
            r = at.get((size, f))
            cells.append(
                "" if r is None else (f"**{r['sigma_bits']:,.0f}**" if r["shortest"] else f"{r['sigma_bits']:,.0f}")
            )
        lines.append(f"| {size} | {first['params']:,} | " + " | ".join(cells) + " |")
    bytes_row = [next((r["bytes"] for r in rows if r["fraction"] == f), 0) for f in fractions]
    lines += ["| (bytes) | | " + " | ".join(f"{b:,}" for b in bytes_row) + " |", "", "Catch-up points:", ""]
    lines += [f"- {catch_up_text(c, bytes_per_token)}" for c in points] or ["- (one size: nothing to compare)"]
    return "\n".join(lines) + "\n"


def plot_cumulative(runs: list[dict], points: list[dict], path: Path) -> Path:
    """Top: cumulative code (bits) against tokens for every size (log-log). Bottom: each size's
    cumulative code per token minus the smallest size's, so a curve that crosses below another
    is where that size catches up."""
    plt = pyplot()
    ordered = sorted((r for r in runs if r["curve"]), key=lambda r: r["row"]["params"])
    sizes = [r for r in ordered if not r.get("mixture")] or ordered
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), dpi=110, sharex=True)
    base_seen, base_bits = cumulative(sizes[0]["curve"])
    for i, run in enumerate(ordered):
        seen, bits = cumulative(run["curve"])
        seen, bits = seen[1:], bits[1:]  # from the first step (log axis)
        label = f"{run['row']['size']} ({run['row']['params']:,} params)"
        style = "--" if run.get("mixture") else "-"
        top.plot(seen, bits, style, color=f"C{i}", label=label)
        keep = seen <= base_seen[-1]
        bottom.plot(
            seen[keep],
            (bits[keep] - np.interp(seen[keep], base_seen, base_bits)) / seen[keep],
            style,
            color=f"C{i}",
            label=label,
        )
    for j, c in enumerate(p for p in points if p["tokens"]):
        bottom.axvline(c["tokens"], color="gray", linestyle=":", linewidth=1)
        bottom.annotate(
            f"{c['big']} passes {c['small']}",
            (c["tokens"], 0),
            fontsize=7,
            rotation=90,
            xycoords=("data", "axes fraction"),
            textcoords="offset points",
            xytext=(2, 4 + 60 * (j % 2)),
        )
    top.set_xscale("log")
    top.set_yscale("log")
    top.set_ylabel("cumulative code Σ of the prefix (bits)")
    top.set_title("Prefix code lengths: the code of the first p tokens is Σ up to p")
    top.legend(fontsize=8)
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.set_ylabel(f"(Σ − {sizes[0]['row']['size']}'s Σ) / p  (bits per token)")
    bottom.set_xlabel("p: tokens coded (first pass)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
