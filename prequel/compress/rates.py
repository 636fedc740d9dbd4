"""The rates of a compressed file: raw (compressed / original) and adjusted (with |model|), beside gzip/bzip2/xz."""

from prequel.compress.frozen import FrozenModel
from prequel.reports.summary import classic_baselines, text_table


def rate_report(data: bytes, compressed_bytes: int, payload_bytes: int, frozen: FrozenModel) -> dict:
    """Raw and adjusted rates next to the classic compressors, as fractions of the original."""
    n = max(len(data), 1)
    model_bytes = frozen.param_bytes + frozen.tokenizer_bytes
    report = {
        "original_bytes": len(data),
        "compressed_bytes": compressed_bytes,
        "payload_bytes": payload_bytes,
        "param_bytes": frozen.param_bytes,
        "tokenizer_bytes": frozen.tokenizer_bytes,
        "params": frozen.gpt.num_params(),
        "raw_rate": compressed_bytes / n,
        "adjusted_rate": (compressed_bytes + model_bytes) / n,
        "bits_per_byte": 8 * compressed_bytes / n,
        "payload_bits_per_byte": 8 * payload_bytes / n,
    }
    for key, bpb in classic_baselines(data).items():
        report[key.removeprefix("baseline/").replace("_bpb", "_rate")] = bpb / 8
    return report


def format_report(r: dict) -> str:
    n = r["original_bytes"]
    rows = [("what", "bytes", "rate", "bits/byte")]

    def row(label: str, nbytes: float) -> None:
        rows.append((label, f"{nbytes:,.0f}", f"{nbytes / max(n, 1):.4f}", f"{8 * nbytes / max(n, 1):.4f}"))

    row("compressed file (raw rate)", r["compressed_bytes"])
    row("  arithmetic-coded payload", r["payload_bytes"])
    row("  header + framing", r["compressed_bytes"] - r["payload_bytes"])
    row(f"model: {r['params']:,} parameters + tokenizer", r["param_bytes"] + r["tokenizer_bytes"])
    row("compressed + model (adjusted rate)", r["compressed_bytes"] + r["param_bytes"] + r["tokenizer_bytes"])
    for name, flag in (("gzip", "-9"), ("bzip2", "-9"), ("xz", "-9e")):
        row(f"{name} {flag} of the same bytes", r[f"{name}_rate"] * n)
    lines = text_table(rows)
    lines.append(
        f"{n:,} bytes, {r['tokens']:,} tokens in {r['chunks']:,} chunks of {r['chunk_size']} "
        f"(top_k {r['top_k'] or 'off'}); compressed at {r['compress_MBps']:.3f} MB/s"
    )
    return "\n".join(lines)
