"""End-of-run numbers: the code length next to the baselines a reader compares it with."""

import bz2
import lzma
import math
import zlib
from pathlib import Path

_GZIP_CONTAINER = 18  # gzip's 10-byte header and 8-byte trailer around the raw deflate stream


def classic_baselines(data) -> dict[str, float]:
    """gzip -9 -n, bzip2 -9, xz -9e of the same bytes (one bytes object, or an iterable of
    pieces: streamed, in bounded memory), in bits per byte (container included)."""
    coders = {
        "baseline/gzip_bpb": zlib.compressobj(9, zlib.DEFLATED, -15),
        "baseline/bzip2_bpb": bz2.BZ2Compressor(9),
        "baseline/xz_bpb": lzma.LZMACompressor(preset=9 | lzma.PRESET_EXTREME),
    }
    sizes = dict.fromkeys(coders, 0)
    sizes["baseline/gzip_bpb"] = _GZIP_CONTAINER
    n = 0
    for piece in [data] if isinstance(data, bytes) else data:
        n += len(piece)
        for name, coder in coders.items():
            sizes[name] += len(coder.compress(piece))
    for name, coder in coders.items():
        sizes[name] += len(coder.flush())
    return {name: 8 * size / max(n, 1) for name, size in sizes.items()}


def code_length_summary(totals: dict, alphabet_size: int, covered) -> dict[str, float]:
    """The metrics of issue #4 under their names; `covered` = the bytes the code covers."""
    parts = totals["f_parts"]
    f_bits = sum(parts.values())
    tokens, nbytes, data_bits = totals["tokens"], totals["nbytes"], totals["data_bits"]
    total = f_bits + tokens + data_bits
    # Uniform code: Bob needs only the length (64 bits) and the alphabet, then log2 m per token.
    uniform = 64 + tokens * math.log2(alphabet_size)
    summary = {
        "code/data_bits": data_bits,
        "code/f_bits": f_bits,
        **{f"code/f_bits/{name}": bits for name, bits in parts.items()},
        "code/n_bits": tokens,
        "code/total_bits": total,
        "code/bpb": total / max(nbytes, 1),
        "code/data_bpb": data_bits / max(nbytes, 1),
        "code/uniform_bits": uniform,
        "code/uniform_bpb": uniform / max(nbytes, 1),
        "data/bytes": nbytes,
        "data/tokens": tokens,
        "data/complete": totals["complete"],
        "train/last_epoch_bpb": totals["last_epoch_bpb"],
    }
    summary.update(classic_baselines(covered))
    return summary


def text_table(rows: list[tuple[str, ...]]) -> list[str]:
    """Cells → aligned lines: the first column left, the others right, a rule under the first row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"{row[0]:<{widths[0]}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(row[1:], widths[1:])) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def format_table(summary: dict) -> str:
    """A table a person reads at a glance."""
    nbytes = max(summary["data/bytes"], 1)
    rows = [("what", "bits", "bits/byte")]

    def row(label: str, bits: float) -> None:
        rows.append((label, f"{bits:,.0f}", f"{bits / nbytes:.4f}"))

    row("code length S = |f| + n + Σ", summary["code/total_bits"])
    row("  Σ −log2 P (area under loss curve)", summary["code/data_bits"])
    row("  n (arithmetic-coding bound)", summary["code/n_bits"])
    row("  |f| program", summary["code/f_bits"])
    for key, bits in summary.items():
        if key.startswith("code/f_bits/"):
            row(f"    {key.rsplit('/', 1)[1]}", bits)
    if "code/stream_bits" in summary:
        row("real arithmetic-coded stream", summary["code/stream_bits"])
    row("uniform code S0", summary["code/uniform_bits"])
    for name in ("gzip", "bzip2", "xz"):
        bpb = summary[f"baseline/{name}_bpb"]
        rows.append(
            (f"{name} {'-9e' if name == 'xz' else '-9'} of the same bytes", f"{bpb * nbytes:,.0f}", f"{bpb:.4f}")
        )
    rows.append(("last epoch cross-entropy (not a code)", "", f"{summary['train/last_epoch_bpb']:.4f}"))
    lines = text_table(rows)
    coverage = f"{summary['data/bytes']:,} bytes, {summary['data/tokens']:,} tokens"
    if not summary["data/complete"]:
        coverage += " — PARTIAL: training stopped before one full pass; the code covers only these"
    return "\n".join(lines + [f"covers {coverage}"])


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_loss_axes(fig, ax, title: str, path: Path) -> Path:
    """The common frame of a loss-curve plot (bits per token against tokens seen), saved to `path`."""
    ax.set_xlabel("tokens seen (first pass)")
    ax.set_ylabel("bits per token before learning it")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
    return path


def plot_loss_curve(curve: list[tuple[int, float, int]], summary: dict, path: Path) -> Path:
    """Per-step bits/token against tokens seen; the shaded area is Σ, the data part of the code."""
    plt = pyplot()
    seen = [0] + [c[0] for c in curve]
    per_token = [c[1] / max(c[2], 1) for c in curve]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.stairs(
        per_token,
        seen,
        fill=True,
        alpha=0.35,
        color="tab:blue",
        label=f"area Σ = {summary['code/data_bits']:,.0f} bits ({summary['code/data_bpb']:.3f} bpb)",
    )
    ax.stairs(per_token, seen, color="tab:blue", linewidth=1)
    ax.axhline(
        summary["code/uniform_bpb"] * summary["data/bytes"] / max(summary["data/tokens"], 1),
        color="gray",
        linestyle="--",
        linewidth=1,
        label="uniform code",
    )
    title = (
        f"Prequential code length: {summary['code/total_bits']:,.0f} bits = {summary['code/bpb']:.3f} bpb (|f| + n + Σ)"
    )
    return save_loss_axes(fig, ax, title, path)
