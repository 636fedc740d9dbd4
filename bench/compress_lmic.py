"""Frozen-model compression (train.py compress) against gzip/xz and FLAC/PNG: the docs/compress.md table.

    python bench/compress_lmic.py --runs RUN_DIR [RUN_DIR ...] [--out DIR] [--top_k 0,4,16] [--chunk_sizes 16,32]
    python bench/compress_lmic.py --coder_vocab 50257 --top_k 0,16,64,256   # the coder alone, synthetic logits

Generates the cross-modal demo files locally (no downloads), compresses each with each run's final
checkpoint, decompresses it (exact bytes checked), and prints markdown tables: raw and adjusted
rate, gzip/xz and the domain codec (FLAC via the `flac` binary, PNG via Pillow, when present),
and compress/decompress MB/s on this machine (wall clock; a shared CPU makes them noisy).
"""

import argparse
import functools
import io
import math
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prequel.alice.encoder import Encoder  # noqa: E402
from prequel.compress.chunks import code_top_k  # noqa: E402
from prequel.compress.codec import compress, decompress  # noqa: E402
from prequel.training.coding import Decoder, code_batch  # noqa: E402

ALICE = ROOT.parent / "shared" / "corpora" / "canterbury" / "alice29.txt"
RATE = 16_000  # Hz, 16-bit mono: LibriSpeech's format


def _wav(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(np.clip(samples, -32768, 32767).astype("<i2").tobytes())
    return buf.getvalue()


def tone_wav(seconds: float = 1.0) -> bytes:
    """A decaying A-major chord with its overtones."""
    t = np.arange(int(seconds * RATE)) / RATE
    chord = sum(np.sin(2 * np.pi * f * k * t) / k for f in (440.0, 554.37, 659.25) for k in (1, 2, 3))
    return _wav(6000 * chord * np.exp(-2.0 * t))


def speechlike_wav(seconds: float = 2.0, seed: int = 0) -> bytes:
    """Vowel-like syllables: a glottal pulse train (gliding pitch, jitter) through two moving
    formant resonators, syllable envelopes, breath noise between them."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t) + rng.normal(0, 1.5, n).cumsum() / 200
    phase = np.cumsum(f0 / RATE)
    source = (np.diff(np.floor(phase), prepend=0) > 0).astype(float)  # one pulse per period
    syllables = 8
    which = np.minimum((t * syllables / seconds).astype(int), syllables - 1)
    formants = rng.uniform([300, 900], [800, 2300], size=(syllables, 2))
    out = np.zeros(n)
    for j, bandwidth in enumerate((80.0, 120.0)):  # two-pole resonators, coefficients per syllable
        r = math.exp(-math.pi * bandwidth / RATE)
        y1 = y2 = 0.0
        freq = formants[which, j]
        a1 = 2 * r * np.cos(2 * np.pi * freq / RATE)
        for i in range(n):
            y = source[i] + a1[i] * y1 - r * r * y2
            out[i] += y
            y1, y2 = y, y1
    envelope = np.sin(np.pi * ((t * syllables / seconds) % 1.0)) ** 2
    signal = out * envelope + rng.normal(0, 0.02, n) * (1 - envelope)
    return _wav(12000 * signal / np.abs(signal).max())


def image_ppm(width: int = 128, height: int = 128, seed: int = 0) -> tuple[bytes, np.ndarray]:
    """A rendered scene: sky gradient, sun, hills, a house, mild sensor noise; PPM (P6) bytes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    img = np.stack([90 + 80 * y, 140 + 70 * y, 230 - 40 * y], axis=-1)  # sky
    sun = np.clip(1.5 - np.hypot(x - 0.75, y - 0.22) / 0.08, 0, 1)[..., None]  # antialiased disc
    img = img * (1 - sun) + np.array([255, 220, 90]) * sun
    hill = np.clip((y - (0.62 + 0.08 * np.sin(6 * x))) * height, 0, 1)[..., None]
    img = img * (1 - hill) + (np.array([60, 140, 50]) + 40 * (y[..., None] - 0.6)) * hill
    house = (x > 0.2) & (x < 0.42) & (y > 0.5) & (y < 0.75)
    img[house] = [170, 60, 50]
    img[(x > 0.28) & (x < 0.34) & (y > 0.62) & (y < 0.75)] = [80, 50, 30]
    roof = (y > 0.38) & (y <= 0.5) & (np.abs(x - 0.31) < (y - 0.38) * 1.1)
    img[roof] = [90, 40, 40]
    pixels = np.clip(img + rng.normal(0, 2.0, img.shape), 0, 255).astype(np.uint8)
    return f"P6\n{width} {height}\n255\n".encode() + pixels.tobytes(), pixels


def flac_bytes(wav: bytes) -> int | None:
    if shutil.which("flac") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "a.wav", Path(tmp) / "a.flac"
        src.write_bytes(wav)
        subprocess.run(["flac", "--best", "--silent", "-f", "-o", str(dst), str(src)], check=True)
        return dst.stat().st_size


def png_bytes(pixels: np.ndarray) -> int | None:
    try:
        from PIL import Image
    except ImportError:
        return None
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=True)
    return len(buf.getvalue())


def demo_files(out: Path) -> dict[str, tuple[Path, str, int | None]]:
    """name -> (path, domain codec name, its size in bytes)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    if ALICE.is_file():
        files["alice29.txt"] = (ALICE, "—", None)
    for name, wav in (("speechlike.wav", speechlike_wav()), ("tone.wav", tone_wav())):
        (out / name).write_bytes(wav)
        files[name] = (out / name, "FLAC --best", flac_bytes(wav))
    ppm, pixels = image_ppm()
    (out / "scene.ppm").write_bytes(ppm)
    files["scene.ppm"] = (out / "scene.ppm", "PNG (zlib, optimize)", png_bytes(pixels))
    return files


def measure(run: Path, path: Path, tmp: Path, **options) -> dict:
    packed, back = tmp / "x.prq", tmp / "x.out"
    r = compress(run, path, packed, **options)
    started = time.perf_counter()
    d = decompress(run, packed, back)
    r["decompress_MBps"] = d["decompress_MBps"]
    r["decompress_wall_s"] = time.perf_counter() - started
    assert back.read_bytes() == path.read_bytes(), f"{path}: round trip differs"
    return r


def coder_speed(vocab: int, top_k: int, rows: int = 64, columns: int = 8, seed: int = 0) -> dict:
    """Encode + decode symbols drawn from Zipf-like synthetic logits (p ∝ (1 + rank)^-2, a few
    bits per symbol like a trained LM's): the coder's cost alone, the part top-k saves, at a
    vocabulary where the model's own cost would not hide it."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.argsort(torch.rand(rows, columns, vocab, generator=g), dim=-1).float()
    logits = -2.0 * torch.log1p(ranks) + 0.3 * torch.randn(rows, columns, vocab, generator=g)
    probs = torch.softmax(logits, dim=-1).flatten(0, 1)
    targets = torch.multinomial(probs, 1, generator=g).view(rows, columns)
    started = time.perf_counter()
    encoder = Encoder()
    code_rows = functools.partial(code_top_k, k=top_k) if top_k else None
    code_batch(lambda t: logits[:, t], targets.clone(), encoder, code_rows)
    words = encoder.words()
    middle = time.perf_counter()
    decoded = torch.zeros_like(targets)
    code_batch(lambda t: logits[:, t], decoded, Decoder(words, encoder.lanes), code_rows)
    done = time.perf_counter()
    assert torch.equal(decoded, targets)
    ideal = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), reduction="sum"
    ).item() / math.log(2)
    n = targets.numel()
    return {
        "bits_per_symbol": 32 * len(words) / n,
        "ideal_bits_per_symbol": ideal / n,
        "encode_sym_s": n / (middle - started),
        "decode_sym_s": n / (done - middle),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=Path, default=[])
    parser.add_argument("--coder_vocab", type=int, help="measure the coder alone at this vocabulary size")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "prequel-lmic-demo")
    parser.add_argument("--top_k", default="", help="comma-separated k to measure on alice29 (0 = off)")
    parser.add_argument("--chunk_sizes", default="", help="comma-separated chunk sizes to measure on alice29")
    parser.add_argument("--batch_chunks", default="", help="comma-separated batch sizes to measure on alice29")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as train.py compress does by default
    if args.coder_vocab:
        print(f"| V = {args.coder_vocab:,} | bits/symbol | ideal | encode symbols/s | decode symbols/s |")
        print("|---|---:|---:|---:|---:|")
        for k in [int(k) for k in args.top_k.split(",") if k] or [0]:
            r = coder_speed(args.coder_vocab, k)
            print(
                f"| {'top_k ' + str(k) if k else 'full distribution'} | {r['bits_per_symbol']:.4f} | "
                f"{r['ideal_bits_per_symbol']:.4f} | {r['encode_sym_s']:,.0f} | {r['decode_sym_s']:,.0f} |",
                flush=True,
            )
        return
    files = demo_files(args.out)
    tmp = Path(tempfile.mkdtemp())
    print(
        "| model | file | bytes | raw rate | adjusted rate | gzip -9 | xz -9e | domain codec "
        "| compress MB/s | decompress MB/s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in args.runs:
        for name, (path, codec, codec_bytes) in files.items():
            r = measure(run, path, tmp)
            domain = f"{codec_bytes / r['original_bytes']:.3f} ({codec})" if codec_bytes else "—"
            print(
                f"| {run.name} ({r['params']:,} params, {r['param_bytes'] / 1e6:.2f} MB) | {name} | "
                f"{r['original_bytes']:,} | {r['raw_rate']:.3f} | {r['adjusted_rate']:.2f} | {r['gzip_rate']:.3f} | "
                f"{r['xz_rate']:.3f} | {domain} | {r['compress_MBps']:.3f} | {r['decompress_MBps']:.3f} |",
                flush=True,
            )
    variants = (
        [("top_k", int(k)) for k in args.top_k.split(",") if k]
        + [("chunk_size", int(c)) for c in args.chunk_sizes.split(",") if c]
        + [("batch_chunks", int(b)) for b in args.batch_chunks.split(",") if b]
    )
    if variants and ALICE.is_file():
        print("\n| model | option | raw rate | bits/byte (payload) | compress MB/s | decompress MB/s |")
        print("|---|---|---:|---:|---:|---:|")
        for run in args.runs:
            for option, value in variants:
                r = measure(run, ALICE, tmp, **{option: value})
                print(
                    f"| {run.name} | {option} {value} | {r['raw_rate']:.4f} | {r['payload_bits_per_byte']:.4f} | "
                    f"{r['compress_MBps']:.3f} | {r['decompress_MBps']:.3f} |",
                    flush=True,
                )
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
