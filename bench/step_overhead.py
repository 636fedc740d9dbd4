"""Step overhead (issue 3): prequel's Lightning training step vs a bare PyTorch loop.

Both sides train the same GPT (same config, same seed, so the same initial weights) on the same
batches (the plan of `training.curriculum.plan_batches` read through `training.data.Tape`) with
the same optimizer (AdamW, param groups, LR schedule and grad clipping of
`PrequelModule.configure_optimizers` and `optim.grad_clip`):

* prequel: the Trainer that `training.run` builds (`build_trainer`) with the CodeLength callback; the
  stream, loggers, checkpoints and progress bar are off.
* lightning: the same Trainer and data with `common.CrossEntropyStep` for the module: a nanoGPT
  step (logits, mean cross-entropy) in Lightning's loop. What it loses to bare is Lightning's cost;
  what prequel loses to it is prequel's own (the coded batch, its loss and softmax, Σ, logging).
* bare: for each batch, forward, mean cross-entropy, backward, clip, AdamW step, scheduler step.

Each warms up, then is timed over `--steps` steps; the three alternate `--repeats` times. Prints
tokens/s of each and the ratios prequel / bare (target ≥ 0.95), lightning / bare (Lightning's
share: what prequel's ratio can reach at most on this machine) and prequel / lightning (prequel's
share); the medians over repeats, and the tokens/s of each side's median step over all repeats
(blind to the slow steps a busy machine adds at random, and to log steps).

    python bench/step_overhead.py [--steps 300] [--config configs/small.yaml] [--model.n_layer 4 ...]
"""

from common import (
    CrossEntropyStep,
    bare_tokens_per_s,
    bench_config,
    bench_parser,
    code_length_callback,
    corpus_prefix,
    lightning_tokens_per_s,
    median,
    median_step_rate,
    print_environment,
)


def main() -> None:
    parser = bench_parser(
        "Throughput of prequel's Lightning step vs a bare PyTorch loop (same model, data, optimizer)."
    )
    parser.add_argument("--steps", type=int, default=300, help="timed steps per run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="prequel/bare runs, alternating (default: %(default)s)")
    args, overrides = parser.parse_known_args()
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1:
        parser.error("--steps, --warmup and --repeats must be >= 1")
    config = bench_config(args.config, ["--stream.enabled", "false"] + overrides)
    if (
        config.trainer.precision != "32-true"
        or config.trainer.accelerator == "gpu"
        or config.optim.schedule != "constant"
    ):
        parser.error(
            "the bare loop here is fp32 on CPU with a constant schedule; "
            "use trainer.precision 32-true, trainer.accelerator cpu, optim.schedule constant"
        )
    print_environment(config)

    # Exactly warmup + steps full batches, so both sides stop at the same place.
    n_tokens = (args.warmup + args.steps) * config.data.batch_size * config.model.block_size
    tokenizer, tokens, tape = corpus_prefix(config, n_tokens)
    print(f"{n_tokens:,} tokens: {args.warmup} warm-up + {args.steps} timed steps per run, {args.repeats} repeats\n")

    rates: dict[str, list[float]] = {"prequel": [], "lightning": [], "bare": []}
    steps: dict[str, list[tuple[int, float]]] = {k: [] for k in rates}  # every timed step of every repeat
    heads = ("prequel tok/s", "lightning tok/s", "bare tok/s", "p/bare", "l/bare", "p/l")
    print(f"{'repeat':>13} " + " ".join(f"{h:>15}" for h in heads))

    def row(label: str, p: float, lightning: float, bare: float) -> None:
        rates, ratios = (p, lightning, bare), (p / bare, lightning / bare, p / lightning)
        print(f"{label:>13} " + " ".join(f"{v:>15,.0f}" for v in rates) + " " + " ".join(f"{v:>15.3f}" for v in ratios))

    vocab = tokenizer.vocab_size
    for r in range(args.repeats):
        callbacks = [code_length_callback(config, tokenizer, len(tokens))]
        rates["prequel"].append(
            lightning_tokens_per_s(config, tape, vocab, callbacks, args.warmup, steps=steps["prequel"])
        )
        rates["lightning"].append(
            lightning_tokens_per_s(config, tape, vocab, [], args.warmup, CrossEntropyStep, steps["lightning"])
        )
        rates["bare"].append(bare_tokens_per_s(config, tape, vocab, args.warmup, steps["bare"]))
        row(str(r + 1), *(v[-1] for v in rates.values()))
    medians = {k: median(v) for k, v in rates.items()}
    row("median", *medians.values())
    row("median step", *(median_step_rate(v) for v in steps.values()))
    print(
        f"\nthroughput ratio prequel / bare (medians): {medians['prequel'] / medians['bare']:.3f}  (target >= 0.95); "
        f"Lightning's loop alone: {medians['lightning'] / medians['bare']:.3f}, "
        f"prequel in it: {medians['prequel'] / medians['lightning']:.3f}"
    )
    print(
        "'median step': tokens/s of the median step of all repeats, blind to the slow steps a busy machine adds "
        "(and to log steps)"
    )


if __name__ == "__main__":
    main()
