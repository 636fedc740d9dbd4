"""prequel's command line: train a GPT and report its loss as a code length.

    prequel [train] --config configs/small.yaml [--data.path notes.txt --trainer.max_steps 200 --run_dir runs/x]
    prequel verify RUN_DIR_OR_STREAM [--out FILE] [--threads N] [--allow-env-mismatch] [--no-fast]
    prequel verify RUN_DIR [--jobs N | --segment K] [--data FILE]      (audit from kept checkpoints)
    prequel compress --ckpt RUN_OR_CKPT INPUT OUTPUT [--chunk-size N] [--batch-chunks B] [--top-k K] [--force]
    prequel decompress --ckpt RUN_OR_CKPT INPUT OUTPUT [--threads N] [--allow-env-mismatch] [--force]
    prequel compare --config configs/compare.yaml [--budget.bytes N --sizes a,b] | --from-runs RUN_DIR...

`prequel` is the installed console script; `python train.py` and `python -m prequel` run the same
`main`. `COMMANDS` is the one table of what it can do: each command's one-line summary (what
`--help` lists), its parser and its handler. Flags are spelt with dashes; their underscore
spellings (--chunk_size) still work. Config keys (--trainer.max_steps) are spelt as in YAML.
"""

import argparse
import difflib
import json
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from prequel.cli.keys_help import Parser, keys_help

PROG = "prequel"  # what usage lines name; `python train.py` runs the same commands


def quiet_warnings() -> None:
    # Lightning's tips about workers and log intervals do not apply to an in-process plan loader.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    os.environ.setdefault("WANDB_SILENT", "true")


# --- train (the default) -------------------------------------------------------------------------


def _train_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<12} {command.summary}" for name, command in COMMANDS.items())
    parser = Parser(
        prog=PROG,
        usage="%(prog)s [train] [--config YAML] [--KEY VALUE ...]\n"
        "       %(prog)s {" + ",".join(COMMANDS) + "} ... (see %(prog)s COMMAND --help)",
        description="Train a GPT and report its loss as a prequential code length.\n"
        f"With no command, %(prog)s trains.\n\ncommands:\n{commands}",
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="a config file (e.g. configs/small.yaml); --KEY VALUE options after it override its keys",
    )

    def epilog() -> str:
        from prequel.checks.settings import Config

        return keys_help(
            Config,
            "config keys: set them in the YAML file, or with --KEY VALUE after it\n"
            "(VALUE is read as YAML: --trainer.max_steps 200 --data.path null --model.bias true)",
        )

    parser.epilog = epilog
    return parser


def _interrupted(e: Exception) -> int:
    """SIGTERM (schedulers, `timeout`): a resumable stop, not a success."""
    print(f"interrupted: {e}", file=sys.stderr)
    return 143


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from prequel.alice.fit import Interrupted
    from prequel.alice.session import train
    from prequel.checks.settings import load_config

    try:
        train(load_config(args.config, overrides))
    except Interrupted as e:
        return _interrupted(e)
    return 0


# --- verify --------------------------------------------------------------------------------------


def _verify_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=f"{PROG} verify", description="Decode a stream by replaying training; every checksum must match."
    )
    parser.add_argument("path", help="a run directory or a stream file")
    parser.add_argument("--out", metavar="FILE", help="where to write the decoded bytes (default: beside the stream)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch threads (must match the encoder's)")
    parser.add_argument("--allow-env-mismatch", action="store_true", help="decode even if versions/threads differ")
    parser.add_argument(
        "--no-fast",
        action="store_true",
        help="decode every batch by f's own procedure, without "
        "the checked single-step path (prequel/verify/fast_decode.py): same bits, slower",
    )
    audit = parser.add_argument_group("audit from the run's kept checkpoints (prequel/verify/audit.py)")
    audit.add_argument("--jobs", type=int, metavar="N", help="check the stretches between checkpoints in N processes")
    audit.add_argument("--segment", type=int, metavar="K", help="check stretch K only (for an external scheduler)")
    audit.add_argument("--data", metavar="FILE", help="the original data (default: the run's data.path)")
    return parser


def _verify(args: argparse.Namespace, overrides: list[str]) -> int:
    from prequel.checks.settings import ConfigError
    from prequel.verify.verifier import verify

    if args.jobs is not None or args.segment is not None:
        return _audit(args)
    if args.data is not None:
        raise ConfigError("--data is for an audit (--jobs or --segment); verify decodes the data from the stream")
    r = verify(args.path, args.out, args.allow_env_mismatch, args.threads, fast=not args.no_fast)
    if r is None:  # another process of a multi-process replay: rank 0 reports
        return 0
    print(f"decoded {r['tokens']:,} tokens ({r['bytes']:,} bytes) in {r['seconds']:.1f} s")
    if r["fast_batches"] or r["slow_batches"]:
        print(
            f"batches decoded by checked single steps: {r['fast_batches']:,}; by f's full forwards: "
            f"{r['slow_batches']:,}" + (" (steps round differently here)" if r["slow_batches"] else "")
        )
    print(f"ideal Σ −log2 P      {r['ideal_bits']:>14,.1f} bits")
    print(f"actual stream        {r['stream_bits']:>14,} bits")
    print(
        f"difference           {r['overhead_bits']:>14,.1f} bits "
        f"({r['overhead_bits'] / max(r['tokens'], 1):.2e} bits/token)"
    )
    if r["complete"]:
        print(f"sha256 {r['sha256']} matches the original; decoded bytes written to {r['output']}")
    else:
        print("the stream covers a partial first pass: coded-token checksums match; no output file written")
    if r["final_weights_equal_checkpoint"] is True:
        print("final weights are bitwise equal to the encoder's final checkpoint")
    elif r["final_weights_equal_checkpoint"]:
        print(f"warning: {r['final_weights_equal_checkpoint']}")
    for diff in r["environment_differences"]:
        print(f"warning: environment differs ({diff}); decoded anyway and every checksum matched")
    print("OK")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from prequel.checks.settings import ConfigError
    from prequel.verify.audit import REPORT_PREFIX, audit, audit_segment

    if args.out is not None:
        raise ConfigError("--out: an audit writes no decoded file (it compares with --data)")
    if args.jobs is not None and args.segment is not None:
        raise ConfigError("--jobs runs every stretch; --segment runs one: give one of them")
    if args.segment is not None:
        r = audit_segment(args.path, args.segment, args.data, args.threads, args.allow_env_mismatch)
        print(
            f"stretch {r['stretch']} ({r['steps']}, from {r['checkpoint']}): {r['batches']:,} batches decoded "
            f"and equal to the data, states checked at steps {r['states_checked']}, {r['seconds']:.1f} s"
        )
        print(REPORT_PREFIX + json.dumps(r))
        return 0
    if args.jobs < 1:
        raise ConfigError(f"--jobs: must be at least 1, got {args.jobs}")
    r = audit(args.path, args.jobs, args.data, args.threads, args.allow_env_mismatch)
    for s in r["stretches"]:
        print(
            f"stretch {s['stretch']} ({s['steps']}): "
            + (f"OK, {s['batches']:,} batches, {s['seconds']:.1f} s" if s["ok"] else f"FAILED: {s['error']}")
        )
    print(
        f"{len(r['stretches'])} stretches, {r['jobs']} at a time (torch threads per job: {r['threads'] or 'default'}): "
        f"{r['seconds']:.1f} s"
    )
    if not r["ok"]:
        bad = ", ".join(str(s["stretch"]) for s in r["stretches"] if not s["ok"])
        print(f"error: the audit failed in stretch {bad}", file=sys.stderr)
        return 1
    print("OK")
    return 0


# --- compress / decompress -----------------------------------------------------------------------


def _lmic_parser(command: str) -> argparse.ArgumentParser:
    parser = Parser(prog=f"{PROG} {command}", description=COMMANDS[command].summary.capitalize() + ".")
    parser.add_argument(
        "--ckpt",
        required=True,
        metavar="RUN_OR_CKPT",
        help="a run directory (its checkpoints/last.ckpt) or a .ckpt file",
    )
    parser.add_argument("input", help="the file to compress" if command == "compress" else "a file made by compress")
    parser.add_argument("output", help="where to write the result (a new file, unless --force)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace OUTPUT if it exists (never the input, the checkpoint or its run's files)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads (compress: default 1; decompress: default and must be the compressor's)",
    )
    if command == "compress":
        parser.add_argument(
            "--chunk-size",
            type=int,
            metavar="N",
            help="tokens per chunk, each coded from a fresh context (default: the model's block_size)",
        )
        parser.add_argument("--batch-chunks", type=int, metavar="B", help="chunks coded at once (default 256)")
        parser.add_argument(
            "--top-k", type=int, default=0, metavar="K", help="code among the top k + an escape (0 = off)"
        )
        parser.add_argument(
            "--kernels",
            choices=("native", "portable"),
            default="native",
            help="portable: decompresses on any x86-64 CPU with AVX2 (slower); see README",
        )
    else:
        parser.add_argument("--allow-env-mismatch", action="store_true", help="decode even if versions/threads differ")
    return parser


def _os_error(e: OSError) -> int:
    """compress/decompress write one file, whole or not at all: there is nothing to resume."""
    where = f": {e.filename}" if e.filename else ""
    print(f"error: {e.strerror or e}{where}", file=sys.stderr)
    return 4


def _compress(args: argparse.Namespace, overrides: list[str]) -> int:
    from prequel.compress import codec as lmic
    from prequel.compress.rates import format_report

    try:
        r = lmic.compress(
            args.ckpt,
            args.input,
            args.output,
            chunk_size=args.chunk_size,
            batch_chunks=args.batch_chunks,
            top_k=args.top_k,
            threads=args.threads,
            kernels=args.kernels,
            overwrite=args.force,
        )
    except OSError as e:
        return _os_error(e)
    print(format_report(r))
    return 0


def _decompress(args: argparse.Namespace, overrides: list[str]) -> int:
    from prequel.compress import codec as lmic

    try:
        r = lmic.decompress(
            args.ckpt,
            args.input,
            args.output,
            threads=args.threads,
            allow_env_mismatch=args.allow_env_mismatch,
            overwrite=args.force,
        )
    except OSError as e:
        return _os_error(e)
    for diff in r["environment_differences"]:
        print(f"warning: environment differs ({diff}); decoded anyway and the sha256 matched")
    print(
        f"decompressed {r['original_bytes']:,} bytes at {r['decompress_MBps']:.3f} MB/s; "
        f"sha256 {r['sha256']} matches the original; written to {r['output']}"
    )
    return 0


# --- compare -------------------------------------------------------------------------------------


def _compare_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=f"{PROG} compare",
        description="Train a size sweep (or read finished runs) and compare "
        "their code lengths.\nOther options: sweep keys (below), or run settings for every size "
        f"(--trainer.num_threads 2:\nthe config keys of {PROG} --help).",
    )
    parser.add_argument("--config", metavar="YAML", help="sweep YAML (configs/compare.yaml)")
    parser.add_argument("--from-runs", nargs="+", metavar="RUN_DIR", help="compare these finished runs; train nothing")

    def epilog() -> str:
        from prequel.reports.sweep import Sweep

        return keys_help(Sweep, "sweep keys: set in the sweep YAML, or --KEY VALUE")

    parser.epilog = epilog
    return parser


def _compare(args: argparse.Namespace, overrides: list[str]) -> int:
    from prequel.alice.fit import Interrupted
    from prequel.reports.sweep import from_command_line

    try:
        return from_command_line(args.config, args.from_runs, overrides)
    except Interrupted as e:
        return _interrupted(e)


@dataclass(frozen=True)
class Command:
    summary: str  # the one line `prequel --help` shows
    parser: Callable[[], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace, list[str]], int]  # the parsed flags, then the --KEY VALUE config overrides
    overrides: bool = False  # takes config keys after its flags; a command without refuses unknown options


COMMANDS = {
    "train": Command("train with the prequential code length (the default)", _train_parser, _train, overrides=True),
    "verify": Command("decode a training stream by replaying training; check every bit", _verify_parser, _verify),
    "compress": Command("compress any file with a frozen trained model", lambda: _lmic_parser("compress"), _compress),
    "decompress": Command("decompress a file made by compress", lambda: _lmic_parser("decompress"), _decompress),
    "compare": Command(
        "train models of several sizes on the same data and compare their code lengths",
        _compare_parser,
        _compare,
        overrides=True,
    ),
}


def main(argv: list[str] | None = None) -> int:
    from prequel.training import environment  # imports no torch: kernel pins must precede torch's start

    if argv is None:  # a real command line: it may re-execute itself with the pins a run needs
        environment.allow_reexec()
    argv = sys.argv[1:] if argv is None else argv
    quiet_warnings()
    from prequel.checks.settings import ConfigError
    from prequel.training.data import DataError
    from prequel.training.stream import StreamError

    named = bool(argv) and argv[0] in COMMANDS
    name, rest = (argv[0], argv[1:]) if named else ("train", argv)
    command = COMMANDS[name]
    parser = command.parser()
    if not named and argv and not argv[0].startswith("-"):  # a word where a command or an option goes
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        parser.error(
            f"unknown command {argv[0]!r}"
            + (
                f" (did you mean {close[0]}?)"
                if close
                else f"; commands: {', '.join(COMMANDS)}; a config file goes after --config"
            )
        )
    if command.overrides:
        args, overrides = parser.parse_known_args(rest)
    else:
        args, overrides = parser.parse_args(rest), []
    try:
        return command.run(args, overrides)
    except (ConfigError, DataError, environment.KernelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StreamError as e:
        print(f"stream error: {e}", file=sys.stderr)
        return 3
    except OSError as e:  # disk full, unwritable run directory: files are whole or absent (atomic writes)
        where = f": {e.filename}" if e.filename else ""
        then = (
            "no decoded output was written"
            if name == "verify"
            else "fix it and re-run the same command to resume from the last checkpoint"
        )
        print(f"error: {e.strerror or e}{where} ({then})", file=sys.stderr)
        return 4
