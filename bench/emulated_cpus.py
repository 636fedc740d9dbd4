"""Verify a portable stream on other CPUs than this one, emulated (issue 14): qemu's user-mode
x86-64 emulator runs train.py verify with another CPU model's CPUID (vendor, AVX2 and no AVX-512,
cache sizes), so torch, MKL and oneDNN choose their code paths as they would on that CPU.

    apt-get install qemu-user        # once (Debian/Ubuntu)
    python bench/emulated_cpus.py [STREAM] [--cpus EPYC-Rome-v1,Haswell-v1]

STREAM defaults to the committed fixture. Emulation is ~100x slower than the real CPU: the
fixture takes about 4 minutes per CPU model. Emulated floating point is IEEE-exact (qemu's
softfloat); what differs is what CPUID makes the libraries choose, and approximate instructions
(rcpps, rsqrtps), whose results differ between real CPU vendors too. This found MKL VML's sqrt
in AdamW (models/portable_math.py). The pins are set here, before torch starts, since the
emulator does not follow train.py's re-exec.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prequel.training import environment  # noqa: E402

CPUS = ("EPYC-Rome-v1", "Haswell-v1")  # AMD Zen 2 and Intel, both AVX2 without AVX-512


def verify_on(cpu: str, stream: Path) -> tuple[bool, float, str]:
    env = {k: v for k, v in os.environ.items() if k not in environment.KERNEL_VARIABLES}
    env |= environment.PORTABLE_PINS | {"OMP_WAIT_POLICY": "PASSIVE"}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / stream.name  # verify writes the decoded bytes beside the stream
        shutil.copyfile(stream, copy)
        started = time.perf_counter()
        r = subprocess.run(
            ["qemu-x86_64", "-cpu", cpu, sys.executable, str(ROOT / "train.py"), "verify", str(copy)],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
        )
        seconds = time.perf_counter() - started
    ok = r.returncode == 0 and "OK" in r.stdout.split()
    said = [
        line
        for line in (r.stdout if ok else r.stderr).splitlines()  # verify's own summary lines
        if line.startswith(("decoded ", "batches decoded", "stream error"))
    ]
    return ok, seconds, "; ".join(said or [f"exit {r.returncode}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stream", nargs="?", type=Path, default=ROOT / "tests" / "fixtures" / "portable.prequel")
    parser.add_argument("--cpus", default=",".join(CPUS), help="qemu CPU models (qemu-x86_64 -cpu help)")
    args = parser.parse_args()
    if shutil.which("qemu-x86_64") is None:
        raise SystemExit("qemu-x86_64 not found: install qemu-user (apt-get install qemu-user)")
    failed = 0
    for cpu in args.cpus.split(","):
        ok, seconds, last = verify_on(cpu, args.stream)
        failed += not ok
        print(f"{cpu:16s} {'OK' if ok else 'FAILED':7s} {seconds:7.1f} s  {last}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
