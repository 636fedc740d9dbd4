"""prequel: train a GPT and report its loss as a code length.

    python train.py --config configs/small.yaml [--data.path notes.txt --trainer.max_steps 200 --run_dir runs/x]
    python train.py verify RUN_DIR_OR_STREAM [--out FILE] [--threads N] [--allow-env-mismatch]
    python train.py compress --ckpt RUN_OR_CKPT INPUT OUTPUT [--chunk_size N] [--batch_chunks B] [--top_k K]
    python train.py decompress --ckpt RUN_OR_CKPT INPUT OUTPUT [--threads N] [--allow-env-mismatch]
    python train.py compare --config configs/compare.yaml [--budget.bytes N --sizes a,b] | --from_runs RUN_DIR...
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


def _lmic(argv: list[str], command: str) -> int:
    parser = argparse.ArgumentParser(prog=f"train.py {command}",
                                     description=f"{command.capitalize()} any file with a frozen trained model.")
    parser.add_argument("--ckpt", required=True, help="a run directory (its checkpoints/last.ckpt) or a .ckpt file")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--threads", type=int,
                        help="torch threads (compress: default 1; decompress: default and must be the compressor's)")
    if command == "compress":
        parser.add_argument("--chunk_size", type=int, help="tokens per chunk, each coded from a fresh context "
                            "(default: the model's block_size)")
        parser.add_argument("--batch_chunks", type=int, help="chunks coded at once (default 256)")
        parser.add_argument("--top_k", type=int, default=0, help="code among the top k + an escape (0 = off)")
        parser.add_argument("--kernels", choices=("native", "portable"), default="native",
                            help="portable: decompresses on any x86-64 CPU with AVX2 (slower); see README")
    else:
        parser.add_argument("--allow-env-mismatch", action="store_true", help="decode even if versions/threads differ")
    args = parser.parse_args(argv)
    from training import lmic

    if command == "compress":
        r = lmic.compress(args.ckpt, args.input, args.output, chunk_size=args.chunk_size,
                          batch_chunks=args.batch_chunks, top_k=args.top_k, threads=args.threads,
                          kernels=args.kernels)
        print(lmic.format_report(r))
    else:
        r = lmic.decompress(args.ckpt, args.input, args.output, threads=args.threads,
                            allow_env_mismatch=args.allow_env_mismatch)
        for diff in r["environment_differences"]:
            print(f"warning: environment differs ({diff}); decoded anyway and the sha256 matched")
        print(f"decompressed {r['original_bytes']:,} bytes at {r['decompress_MBps']:.3f} MB/s; "
              f"sha256 {r['sha256']} matches the original; written to {r['output']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from training import environment  # imports no torch: kernel pins must precede torch's start

    if argv is None:  # a real command line: it may re-execute itself with the pins a run needs
        environment.allow_reexec()
    argv = sys.argv[1:] if argv is None else argv
    _quiet()
    from training.config import ConfigError
    from training.data import DataError
    from training.stream import StreamError

    try:
        if argv and argv[0] == "verify":
            return _verify(argv[1:])
        if argv and argv[0] == "compare":
            from training.compare import main as compare

            return compare(argv[1:])
        if argv and argv[0] in ("compress", "decompress"):
            return _lmic(argv[1:], argv[0])
        return _train(argv)
    except (ConfigError, DataError, environment.KernelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StreamError as e:
        print(f"stream error: {e}", file=sys.stderr)
        return 3
    except OSError as e:  # disk full, unwritable run directory: files are whole or absent (atomic writes)
        where = f": {e.filename}" if e.filename else ""
        then = ("no decoded output was written" if argv and argv[0] == "verify" else
                "fix it and re-run the same command to resume from the last checkpoint")
        print(f"error: {e.strerror or e}{where} ({then})", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
