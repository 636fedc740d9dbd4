"""Stream costs (issue 5): encode overhead and decode/train time.

(a) encode overhead: steady-state tokens/s of prequel's Trainer (`training.run.build_trainer`, CodeLength
    callback, no loggers or checkpoints) on the first `--tokens` tokens, with the StreamEncoder
    callback vs without; the two alternate `--repeats` times. Target ratio >= 0.90.
(b) decode/train time: `prequel.alice.session.train` with the stream on, into a temporary run directory,
    on the first `--decode-tokens` tokens (written to a temporary data file), then
    `prequel.verify.verifier.verify` on that run (checked single steps, prequel/verify/fast_decode.py; then again
    with f's
    own procedure alone); prints decode seconds / train seconds (whole calls) and,
    when (a) ran, the steady-state ratio (a)'s stream-on tokens/s / verify's Trainer.fit tokens/s.
(The coder alone, per vocabulary and batch size: bench/coder.py.)

    python bench/stream_speed.py [--tokens 60000] [--decode-tokens 30000] [--skip a,b] [--model.n_layer 4 ...]
"""

import contextlib
import io
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import (
    bench_config,
    bench_parser,
    code_length_callback,
    corpus_prefix,
    lightning_tokens_per_s,
    median,
    print_environment,
)

from prequel.alice.encoder import StreamEncoder
from prequel.alice.fit import stream_header
from prequel.alice.session import train
from prequel.training.stream import StreamError
from prequel.verify.verifier import verify


class TimedStream(StreamEncoder):
    """The encoder callback, timing its own per-batch hooks: a low-noise view of its cost."""

    seconds, batches = 0.0, 0

    def on_train_batch_start(self, *args) -> None:
        t0 = time.perf_counter()
        super().on_train_batch_start(*args)
        self.seconds += time.perf_counter() - t0

    def on_train_batch_end(self, *args) -> None:
        t0 = time.perf_counter()
        super().on_train_batch_end(*args)
        self.seconds, self.batches = self.seconds + time.perf_counter() - t0, self.batches + 1


def encode_overhead(config, n_tokens: int, warmup: int, repeats: int) -> float:
    """Prints the ratio; returns the stream-on training tokens/s (median)."""
    tokenizer, tokens, tape = corpus_prefix(config, n_tokens)
    print(f"(a) encode overhead: {n_tokens:,} tokens, throughput after {warmup} warm-up steps")
    rates, hook_ms = {False: [], True: []}, []
    for _ in range(repeats):
        for enabled in (False, True):
            callbacks = [code_length_callback(config, tokenizer, len(tokens))]
            if enabled:
                header = stream_header(config, tokenizer, len(tokens))
                callbacks.append(TimedStream(tape, config.stream.checksum_every, header=header))
            rates[enabled].append(lightning_tokens_per_s(config, tape, tokenizer.vocab_size, callbacks, warmup))
            if enabled:
                hook_ms.append(1e3 * callbacks[-1].seconds / callbacks[-1].batches)
    off, on = median(rates[False]), median(rates[True])
    step_ms = 1e3 * config.data.batch_size * config.model.block_size / on  # a full batch, stream on
    print(f"    stream off {off:>10,.0f} tok/s   (runs: {', '.join(f'{r:,.0f}' for r in rates[False])})")
    print(f"    stream on  {on:>10,.0f} tok/s   (runs: {', '.join(f'{r:,.0f}' for r in rates[True])})")
    print(f"    throughput ratio on / off (medians): {on / off:.3f}  (target >= 0.90)")
    print(
        f"    stream hooks {median(hook_ms):.2f} ms of a {step_ms:.1f} ms step (medians): "
        f"ratio without timing noise {1 - median(hook_ms) / step_ms:.3f}\n"
    )
    return on


def decode_train_ratio(config, n_tokens: int, train_rate: float | None, label: str = "(b)") -> None:
    tokenizer, tokens, _ = corpus_prefix(config, n_tokens)
    print(f"{label} decode / train time: {n_tokens:,} tokens, train with the stream, then verify the run")
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "prefix.txt"
        data_path.write_bytes(tokenizer.decode(tokens))
        run_config = replace(
            config,
            run_dir=str(Path(tmp) / "run"),
            data=replace(config.data, path=str(data_path)),
            stream=replace(config.stream, enabled=True),
        )
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # train/verify print their own reports
                started = time.perf_counter()
                summary = train(run_config)
                train_s = time.perf_counter() - started
                started = time.perf_counter()
                report = verify(Path(run_config.run_dir))
                decode_s = time.perf_counter() - started
                started = time.perf_counter()
                verify(Path(run_config.run_dir), fast=False)
                f_decode_s = time.perf_counter() - started
        except StreamError as e:  # e.g. the source was edited between train and verify (code hash)
            print(f"    verify failed: {e}\n")
            return
    print(
        f"    train  {train_s:8.2f} s  ({n_tokens / train_s:,.0f} tok/s), stream {summary['code/stream_bits']:,} bits"
    )
    print(
        f"    decode {decode_s:8.2f} s  ({n_tokens / decode_s:,.0f} tok/s; its Trainer.fit {report['seconds']:.2f} s), "
        f"sha256 matched, final weights equal: {report['final_weights_equal_checkpoint']}; batches by checked "
        f"single steps {report['fast_batches']:,}, by f's full forwards {report['slow_batches']:,}"
    )
    print(
        f"    decode / train time (whole calls): {decode_s / train_s:.2f}x  (moonshot <= 5x); "
        f"f's own procedure alone (verify --no-fast): {f_decode_s:.2f} s, {f_decode_s / train_s:.2f}x"
    )
    if train_rate is not None:  # train()'s fixed costs (|f|, Trainer, checkpoint) weigh on short runs
        decode_rate = n_tokens / report["seconds"]
        print(
            f"    steady state: the stream-on training's {train_rate:,.0f} tok/s / "
            f"decode's Trainer.fit {decode_rate:,.0f} tok/s "
            f"= {train_rate / decode_rate:.2f}x"
        )
    print()


def main() -> None:
    parser = bench_parser("Stream encode overhead and decode/train time ratio.")
    parser.add_argument("--tokens", type=int, default=60000, help="(a) corpus prefix (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10, help="(a) untimed steps per run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="(a) runs per side (default: %(default)s)")
    parser.add_argument(
        "--decode-tokens",
        type=int,
        default=30000,
        help="(b) corpus prefix; small ones flatter the ratio, train()'s fixed costs dominate (default: %(default)s)",
    )
    parser.add_argument("--skip", default="", help="parts to skip, e.g. b or a,b (default: none)")
    args, overrides = parser.parse_known_args()
    if min(args.tokens, args.warmup, args.repeats, args.decode_tokens) < 1:
        parser.error("every count must be >= 1")
    skip = set(args.skip.replace(",", ""))
    config = bench_config(args.config, ["--stream.enabled", "false"] + overrides)
    print_environment(config)
    print(f"stream.checksum_every {config.stream.checksum_every}\n")
    train_rate = None
    if "a" not in skip:
        train_rate = encode_overhead(config, args.tokens, args.warmup, args.repeats)
    if "b" not in skip:
        decode_train_ratio(config, args.decode_tokens, train_rate)


if __name__ == "__main__":
    main()
