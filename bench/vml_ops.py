"""Which ATen ops go through MKL's vector math (VML) on this build: the ops whose results
`MKL_CBWR=COMPATIBLE` changes (issue 14). VML's COMPATIBLE branch is not correctly rounded and not
the same on every CPU, so portable code must not compute bits with them (models/portable_math.py).

    python bench/vml_ops.py          # prints the affected ops and whether VML_OPS lists them all

Each op runs on the same float32 inputs in two fresh processes, one with MKL_CBWR=COMPATIBLE and
one without, both with ATen pinned to AVX2; an op whose output bytes differ is affected.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prequel.models.portable_math import VML_OPS  # noqa: E402

# ATen op name -> the call on a positive float32 tensor x (4,096 values in [0.01, 1]).
CANDIDATES = {
    **{
        name: getattr(torch, name)
        for name in (
            "sqrt",
            "rsqrt",
            "exp",
            "exp2",
            "expm1",
            "log",
            "log2",
            "log10",
            "log1p",
            "sin",
            "cos",
            "tan",
            "tanh",
            "sinh",
            "cosh",
            "asin",
            "acos",
            "atan",
            "erf",
            "erfc",
            "erfinv",
            "sigmoid",
            "reciprocal",
            "abs",
            "neg",
            "trunc",
            "floor",
            "ceil",
            "round",
            "frac",
            "lgamma",
            "digamma",
            "sign",
        )
    },
    "pow": lambda x: x.pow(0.5),
    "logsumexp": lambda x: torch.logsumexp(x.view(64, 64), -1),
    "gelu": F.gelu,
    "silu": F.silu,
    "softplus": F.softplus,
    "log_softmax": lambda x: F.log_softmax(x.view(64, 64), -1),
    "softmax": lambda x: F.softmax(x.view(64, 64), -1),
    "linalg_vector_norm": lambda x: x.view(64, 64).norm(dim=-1),
    "xlogy": lambda x: torch.special.xlogy(1.0, x),
    "addcdiv": lambda x: x.addcdiv(x, x + 1),
    "native_layer_norm": lambda x: F.layer_norm(x.view(64, 64), (64,)),
}


def hashes() -> dict[str, str]:
    torch.manual_seed(0)
    x = torch.rand(4096) * 0.99 + 0.01
    return {name: hashlib.sha256(fn(x).contiguous().numpy().tobytes()).hexdigest() for name, fn in CANDIDATES.items()}


def run(mkl_cbwr: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "ATEN_CPU_CAPABILITY")}
    env["ATEN_CPU_CAPABILITY"] = "avx2"
    if mkl_cbwr:
        env["MKL_CBWR"] = mkl_cbwr
    out = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


def affected() -> set[str]:
    a, b = run(None), run("COMPATIBLE")
    return {name for name in a if a[name] != b[name]}


def main() -> None:
    if sys.argv[1:] == ["--child"]:
        print(json.dumps(hashes()))
        return
    found = affected()
    print(f"ops MKL_CBWR=COMPATIBLE changes (VML-routed): {sorted(found)}")
    missing = found - VML_OPS
    print("models/portable_math.VML_OPS lists them all" if not missing else f"NOT in VML_OPS: {sorted(missing)}")
    sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()
