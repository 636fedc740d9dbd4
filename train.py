"""prequel: train a GPT and report its loss as a code length.

    python train.py --config configs/small.yaml [--data.path notes.txt --trainer.max_steps 200 --run_dir runs/x]
    python train.py verify RUN_DIR_OR_STREAM [--out FILE] [--threads N] [--allow-env-mismatch]
"""

import argparse
import os
import sys
import warnings


def _quiet() -> None:
    # Lightning's tips about workers and log intervals do not apply to an in-process plan loader.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    os.environ.setdefault("WANDB_SILENT", "true")


def _train(argv: list[str]) -> int:
    from training.config import load_config

    parser = argparse.ArgumentParser(prog="train.py", description="Train with the prequential code length.")
    parser.add_argument("--config", help="YAML config (e.g. configs/small.yaml)")
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    from training.run import train

    train(config)
    return 0


def _verify(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="train.py verify", description="Decode a stream by replaying training.")
    parser.add_argument("path", help="a run directory or a stream file")
    parser.add_argument("--out", help="where to write the decoded bytes (default: beside the stream)")
    parser.add_argument("--threads", type=int, help="torch threads (must match the encoder's)")
    parser.add_argument("--allow-env-mismatch", action="store_true", help="decode even if versions/threads differ")
    args = parser.parse_args(argv)
    from training.run import verify

    r = verify(args.path, args.out, args.allow_env_mismatch, args.threads)
    print(f"decoded {r['tokens']:,} tokens ({r['bytes']:,} bytes) in {r['seconds']:.1f} s")
    print(f"ideal Σ −log2 P      {r['ideal_bits']:>14,.1f} bits")
    print(f"actual stream        {r['stream_bits']:>14,} bits")
    print(f"difference           {r['overhead_bits']:>14,.1f} bits ({r['overhead_bits'] / max(r['tokens'], 1):.2e} bits/token)")
    if r["complete"]:
        print(f"sha256 {r['sha256']} matches the original; decoded bytes written to {r['output']}")
    else:
        print("the stream covers a partial first pass: coded-token checksums match; no output file written")
    if r["final_weights_equal_checkpoint"]:
        print("final weights are bitwise equal to the encoder's final checkpoint")
    for diff in r["environment_differences"]:
        print(f"warning: environment differs ({diff}); decoded anyway and every checksum matched")
    print("OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _quiet()
    from training.config import ConfigError
    from training.data import DataError
    from training.stream import StreamError

    try:
        if argv and argv[0] == "verify":
            return _verify(argv[1:])
        return _train(argv)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StreamError as e:
        print(f"stream error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
