"""The table of bad inputs in docs/reliability.md, from real runs of train.py's entry point.

Each row runs `train.main(argv)` (the CLI, in this process, so the table takes seconds, not a
minute of interpreter start-ups) on one bad input and records the exit code and the one line
it printed; "full disk" runs train.py in a child process whose file-size limit makes writes
fail (RLIMIT_FSIZE, SIGXFSZ ignored), as a full disk does, and the real 2-thread decode runs in a
child process too (with passive OpenMP waiting). Temporary paths print as $TMP.

    python bench/bad_inputs.py > table.md
"""

import contextlib
import fcntl
import io
import logging
import os
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prequel.training import environment  # noqa: E402

environment.allow_reexec()
environment.ensure_kernels("portable")  # tiny.yaml's kernels; re-executes this script with the pins if needed

from prequel.cli import commands as cli  # noqa: E402
from prequel.training.stream import (  # noqa: E402
    MAGIC,
    VERSION,
    decode_stream,
    encode_stream,  # noqa: E402
)

TINY = ROOT / "configs" / "tiny.yaml"


def run(tmp: Path, *argv) -> tuple[int, str]:
    """Exit code and the line a person reads (the error, or else the last line)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    lines = [
        ln
        for ln in (err.getvalue() + out.getvalue()).splitlines()
        if ln.startswith(("error:", "stream error:", "warning:"))
    ] or out.getvalue().splitlines()[-1:]
    return rc, lines[0].replace(str(tmp), "$TMP") if lines else ""


def full_disk(tmp: Path, text: Path) -> tuple[int, str]:
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    r = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            str(TINY),
            "--data.path",
            str(text),
            "--run_dir",
            str(tmp / "full"),
            "--logging.progress_bar",
            "false",
            "--trainer.checkpoint_every_n_steps",
            "4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("error:"))
    assert "Traceback" not in r.stderr
    return r.returncode, line.replace(str(tmp), "$TMP")


def real_thread_drift(tmp: Path, run_dir: Path) -> tuple[int, str]:
    """Decode a 1-thread stream with 2 threads for real (passive OpenMP waiting changes no bit)."""
    r = subprocess.run(
        [sys.executable, "train.py", "verify", str(run_dir), "--threads", "2", "--allow-env-mismatch"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    line = next(ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith(("warning:", "stream error:")))
    return r.returncode, line.replace(str(tmp), "$TMP")


def sigterm(tmp: Path) -> tuple[int, str]:
    """SIGTERM (what schedulers and `timeout` send) two seconds into training."""
    text = tmp / "long.txt"
    text.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:300_000])
    proc = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            "--config",
            str(TINY),
            "--data.path",
            str(text),
            "--run_dir",
            str(tmp / "term"),
            "--logging.progress_bar",
            "false",
            "--trainer.max_steps",
            "1500",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("prequel:"):
            break
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    line = next(ln for ln in err.splitlines() if ln.startswith("interrupted:"))
    return proc.returncode, line.replace(str(tmp), "$TMP")


def busy_run_dir(tmp: Path, text: Path) -> tuple[int, str]:
    """A second training process on a run directory another one holds (its lock taken here)."""
    run_dir = tmp / "busy"
    run_dir.mkdir()
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    r = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            str(TINY),
            "--data.path",
            str(text),
            "--run_dir",
            str(run_dir),
            "--logging.progress_bar",
            "false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    os.close(fd)
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("error:"))
    return r.returncode, line.replace(str(tmp), "$TMP")


def stream_file(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).mkdir()
    (tmp / name / "stream.prequel").write_bytes(data)
    return tmp / name


def forged(segment_count: int | None = None, segment_words: int | None = None, header: bytes = b"{}") -> bytes:
    """A stream whose framing lies while every crc is right."""
    words = struct.pack("<I", 7)
    payload = struct.pack("<I", 1 if segment_count is None else segment_count)
    payload += struct.pack("<QQ", 1, 1 if segment_words is None else segment_words) + words
    sec = lambda body: struct.pack("<I", len(body)) + body + struct.pack("<I", zlib.crc32(body))  # noqa: E731
    return (
        MAGIC + struct.pack("<H", VERSION) + sec(header) + payload + struct.pack("<I", zlib.crc32(payload)) + sec(b"{}")
    )


def main() -> None:
    cli.quiet_warnings()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        text = tmp / "text.txt"
        text.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:3000])
        run_dir = tmp / "run"
        rc, _ = run(
            tmp,
            "--config",
            TINY,
            "--data.path",
            text,
            "--run_dir",
            run_dir,
            "--logging.progress_bar",
            "false",
            "--trainer.checkpoint_every_n_steps",
            "4",
        )
        assert rc == 0, "the reference run failed"
        good = (run_dir / "stream.prequel").read_bytes()
        train_args = ["--config", TINY, "--data.path", text, "--run_dir", tmp / "new"]

        def yaml(name: str, body: str | bytes) -> Path:
            path = tmp / name
            path.write_bytes(body if isinstance(body, bytes) else body.encode())
            return path

        def with_stream(name: str, edit) -> Path:
            stream = decode_stream(good)
            edit(stream)
            return stream_file(tmp, name, encode_stream(stream))

        def flip(at: int) -> bytes:
            data = bytearray(good)
            data[at] ^= 0x10
            return bytes(data)

        header_len = struct.unpack_from("<I", good, 10)[0]
        (tmp / "empty.txt").write_bytes(b"")
        (tmp / "short.txt").write_bytes(b"To be, or not to be")
        (tmp / "nofiles").mkdir()
        (tmp / "file").write_text("a regular file")

        (tmp / "reversed.txt").write_bytes(text.read_bytes()[::-1])
        packed = tmp / "packed.prq"
        assert run(tmp, "compress", "--ckpt", run_dir, text, packed)[0] == 0, "the reference compress failed"

        def forged_packed(tokens: int) -> Path:
            stream = decode_stream(packed.read_bytes())
            stream.header["tokens"] = tokens
            path = tmp / f"forged-{tokens}.prq"
            path.write_bytes(encode_stream(stream))
            return path

        def bomb() -> str:
            import base64

            z, zeros = zlib.compressobj(9), bytes(1 << 20)
            return base64.b64encode(b"".join(z.compress(zeros) for _ in range(1024)) + z.flush()).decode()

        def set_params(s):
            s.header["environment"]["num_threads"] = 2
            s.trailer["checksums"]["5"]["params"] = "0" * 64

        # A table, one bad input a line:
        # fmt: off
        rows = [
            ("config", "misspelt key `--model.n_layers 2`", lambda: run(tmp, "--config", TINY, "--model.n_layers", "2")),
            ("config", "unknown nested key in YAML (`optim: {momentum: 0.9}`)",
             lambda: run(tmp, "--config", yaml("a.yaml", "optim:\n  momentum: 0.9\n"))),
            ("config", "wrong type `--trainer.max_steps many`", lambda: run(tmp, "--config", TINY, "--trainer.max_steps", "many")),
            ("config", "wrong type for an optional string `--data.path [1, 2]`",
             lambda: run(tmp, "--config", TINY, "--data.path", "[1, 2]")),
            ("config", "bool for an int `--model.n_layer true`", lambda: run(tmp, "--config", TINY, "--model.n_layer", "true")),
            ("config", "negative `--optim.lr -0.001`", lambda: run(tmp, "--config", TINY, "--optim.lr", "-0.001")),
            ("config", "zero `--data.batch_size 0`", lambda: run(tmp, "--config", TINY, "--data.batch_size", "0")),
            ("config", "negative `--trainer.num_threads -1`", lambda: run(tmp, "--config", TINY, "--trainer.num_threads", "-1")),
            ("config", "not finite `--optim.lr .inf`", lambda: run(tmp, "--config", TINY, "--optim.lr", ".inf")),
            ("config", "bad literal `--trainer.precision fp8`", lambda: run(tmp, "--config", TINY, "--trainer.precision", "fp8")),
            ("config", "seed out of range `--seed -1`", lambda: run(tmp, "--config", TINY, "--seed", "-1")),
            ("config", "`--optim.beta2 1.0`", lambda: run(tmp, "--config", TINY, "--optim.beta2", "1.0")),
            ("config", "derived key `--model.vocab_size 300`", lambda: run(tmp, "--config", TINY, "--model.vocab_size", "300")),
            ("config", "heads do not divide the width `--model.n_head 3`", lambda: run(tmp, "--config", TINY, "--model.n_head", "3")),
            ("config", "YAML that is a list, not a mapping", lambda: run(tmp, "--config", yaml("b.yaml", "- model\n- data\n"))),
            ("config", "invalid YAML (`model: {n_layer: 2`)", lambda: run(tmp, "--config", yaml("c.yaml", "model: {n_layer: 2\n"))),
            ("config", "a Python tag (`!!python/object/apply:os.getpid []`): safe_load only",
             lambda: run(tmp, "--config", yaml("d.yaml", "seed: !!python/object/apply:os.getpid []\n"))),
            ("config", "a section that is not a mapping (`model: 3`)", lambda: run(tmp, "--config", yaml("e.yaml", "model: 3\n"))),
            ("config", "`--trainer.num_threads 100000` (used to crash the process)",
             lambda: run(tmp, "--config", TINY, "--trainer.num_threads", "100000")),
            ("config", "`--trainer.strategy ddp_spawn` with the stream on (used to fail after creating the run directory)",
             lambda: run(tmp, "--config", TINY, "--trainer.strategy", "ddp_spawn")),
            ("config", "`--trainer.accelerator gpu` on a machine without one",
             lambda: run(tmp, *train_args, "--trainer.accelerator", "gpu")),
            ("config", "config file missing", lambda: run(tmp, "--config", tmp / "nope.yaml")),
            ("config", "config file is binary", lambda: run(tmp, "--config", yaml("f.yaml", b"\xff\xfe\x00binary"))),
            ("data", "file missing", lambda: run(tmp, *train_args[:2], "--data.path", tmp / "missing.txt")),
            ("data", "file empty", lambda: run(tmp, *train_args[:2], "--data.path", tmp / "empty.txt")),
            ("data", "directory with no files", lambda: run(tmp, *train_args[:2], "--data.path", tmp / "nofiles")),
            ("data", "glob matching nothing", lambda: run(tmp, *train_args[:2], "--data.path", tmp / "*.none")),
            ("data", "shorter than one sequence (19 bytes, block_size 32)",
             lambda: run(tmp, *train_args[:2], "--data.path", tmp / "short.txt")),
            ("data", "a device, `--data.path /dev/zero` (used to read until memory ran out)",
             lambda: run(tmp, *train_args[:2], "--data.path", "/dev/zero")),
            ("run dir", "the finished run's directory with other data (used to mix two runs, exit 0)",
             lambda: run(tmp, *train_args[:2], "--data.path", tmp / "reversed.txt", "--run_dir", run_dir)),
            ("run dir", "a run directory another training process holds", lambda: busy_run_dir(tmp, text)),
            ("run dir", "SIGTERM during training (exit 143, resumable; used to exit 0)", lambda: sigterm(tmp)),
            ("run dir", "`--run_dir` under a regular file", lambda: run(tmp, *train_args[:4], "--run_dir", tmp / "file" / "run")),
            ("run dir", "`--run_dir` is a regular file", lambda: run(tmp, *train_args[:4], "--run_dir", tmp / "file")),
            ("run dir", "disk full while writing the first checkpoint (100 kB file-size limit)", lambda: full_disk(tmp, text)),
            ("stream", "no stream at the path", lambda: run(tmp, "verify", tmp / "nofiles")),
            ("stream", "empty stream file", lambda: run(tmp, "verify", stream_file(tmp, "s1", b""))),
            ("stream", "not a stream (text)", lambda: run(tmp, "verify", stream_file(tmp, "s2", b"hello world" * 10))),
            ("stream", "format version 9", lambda: run(tmp, "verify", stream_file(tmp, "s3", good[:8] + b"\x09\x00" + good[10:]))),
            ("stream", "truncated to half", lambda: run(tmp, "verify", stream_file(tmp, "s4", good[: len(good) // 2]))),
            ("stream", "truncated by 1 byte", lambda: run(tmp, "verify", stream_file(tmp, "s5", good[:-1]))),
            ("stream", "one bit flipped in the header", lambda: run(tmp, "verify", stream_file(tmp, "s6", flip(40)))),
            ("stream", "one bit flipped in the payload",
             lambda: run(tmp, "verify", stream_file(tmp, "s7", flip(14 + header_len + 8 + 16 + 9)))),
            ("stream", "one bit flipped in the trailer", lambda: run(tmp, "verify", stream_file(tmp, "s8", flip(len(good) - 40)))),
            ("stream", "1 byte appended", lambda: run(tmp, "verify", stream_file(tmp, "s9", good + b"\0"))),
            ("stream", "segment count 2³²−1, crc recomputed", lambda: run(tmp, "verify", stream_file(tmp, "s10", forged(2**32 - 1)))),
            ("stream", "segment length 2⁶⁴−1, crc recomputed",
             lambda: run(tmp, "verify", stream_file(tmp, "s11", forged(segment_words=2**64 - 1)))),
            ("stream", "header JSON nested 100,000 deep, crc recomputed",
             lambda: run(tmp, "verify", stream_file(tmp, "s12", forged(header=b"[" * 100_000 + b"]" * 100_000)))),
            ("stream", "one payload word changed, crc recomputed (decodes, diverges)",
             lambda: run(tmp, "verify", with_stream("s13", lambda s: s.segments[0].words.__setitem__(5, s.segments[0].words[5] ^ 1 << 4)))),
            ("stream", "trailer's data sha256 forged (decodes everything)",
             lambda: run(tmp, "verify", with_stream("s14", lambda s: s.trailer.update(data_sha256="0" * 64)))),
            ("stream", "header's data_tokens forged to 10³⁰, checksums recomputed",
             lambda: run(tmp, "verify", with_stream("s16", lambda s: s.header.update(data_tokens=10**30)))),
            ("stream", "header's tokenizer blob forged, checksums recomputed",
             lambda: run(tmp, "verify", with_stream("s17", lambda s: s.header.update(tokenizer={"name": "bpe", "blob": "00ff"})))),
            ("stream", "written by other source code (code hash)",
             lambda: run(tmp, "verify", with_stream("s15", lambda s: s.header.update(code_hash="0" * 64)))),
            ("stream", "header asks for `model.n_layer: 100000` (used to take 5.6 GB)",
             lambda: run(tmp, "verify", with_stream("b1", lambda s: s.header["config"]["model"].update(n_layer=100000)))),
            ("stream", "header asks for `model.block_size: 2**31`",
             lambda: run(tmp, "verify", with_stream("b2", lambda s: s.header["config"]["model"].update(block_size=2**31)))),
            ("stream", "a 1 GiB zlib bomb as the curriculum order of a sequential run (used to take 3.56 GB)",
             lambda: run(tmp, "verify", with_stream("b3", lambda s: s.header.update(order=bomb())))),
            ("environment", "a native stream from another CPU (header says AVX512 kernels, this process runs AVX2)",
             lambda: run(tmp, "verify", with_stream("k1", lambda s: s.header["environment"].update(
                 kernels="native", cpu_capability="AVX512", kernel_env={}, cpu_model="Another CPU")))),
            ("environment", "a stream written on a GPU, verified on a machine without one (even with `--allow-env-mismatch`)",
             lambda: run(tmp, "verify", with_stream("k2", lambda s: s.header["environment"].update(
                 device="cuda", gpu="NVIDIA H100 80GB HBM3")), "--allow-env-mismatch")),
            ("environment", "`verify --threads 2` of a 1-thread stream", lambda: run(tmp, "verify", run_dir, "--threads", "2")),
            ("environment", "torch version differs (header says 0.0.1+other)",
             lambda: run(tmp, "verify", with_stream("e1", lambda s: s.header["environment"].update(torch="0.0.1+other")))),
            ("environment", "the same, with `--allow-env-mismatch` (exit 0: decoded, every checksum matched)",
             lambda: run(tmp, "verify", tmp / "e1", "--allow-env-mismatch")),
            ("environment", "`verify --threads 2 --allow-env-mismatch` of the 1-thread stream (real 2-thread replay)",
             lambda: real_thread_drift(tmp, run_dir)),
            ("environment", "thread count differs, allowed, and the weights drift (checksum forged)",
             lambda: run(tmp, "verify", with_stream("e2", set_params), "--allow-env-mismatch")),
            ("compress", "`compress` onto an existing file without `--force`",
             lambda: run(tmp, "compress", "--ckpt", run_dir, text, packed)),
            ("compress", "`compress` onto its own checkpoint, even with `--force` (used to destroy the model)",
             lambda: run(tmp, "compress", "--ckpt", run_dir, text, run_dir / "checkpoints" / "last.ckpt", "--force")),
            ("compress", "`compress --chunk-size 0` (used to be replaced silently)",
             lambda: run(tmp, "compress", "--ckpt", run_dir, text, tmp / "c0.prq", "--chunk-size", "0")),
            ("compress", "`compress /dev/zero` (used to say: input file not found)",
             lambda: run(tmp, "compress", "--ckpt", run_dir, "/dev/zero", tmp / "z.prq")),
            ("compress", "`decompress` of a file whose header claims 2²⁸ tokens, crc recomputed (used to take 2.5 GB)",
             lambda: run(tmp, "decompress", "--ckpt", run_dir, forged_packed(2**28), tmp / "d.txt")),
            ("output", "`verify --out` under a regular file", lambda: run(tmp, "verify", run_dir, "--out", tmp / "file" / "x" / "out")),
        ]
        # fmt: on
        print("| what | bad input | exit | what it prints |")
        print("|---|---|---:|---|")
        for kind, what, go in rows:
            rc, line = go()
            print(f"| {kind} | {what} | {rc} | `{line.replace('|', '¦')}` |", flush=True)
        # Nothing above may have left a run directory behind.
        assert not (tmp / "new").exists() and not (tmp / "file").is_dir()


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
