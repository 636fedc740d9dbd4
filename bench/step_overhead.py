"""Step overhead (issue 3): prequel's Lightning training step vs a bare PyTorch loop.

Both sides train the same GPT (same config, same seed, so the same initial weights) on the same
batches (the plan of `training.curriculum.plan_batches` read through `training.data.Tape`) with
the same optimizer (AdamW, param groups, LR schedule and grad clipping of
`PrequelModule.configure_optimizers` and `optim.grad_clip`):

* prequel: the Trainer that `training.run` builds (`build_trainer`) with the CodeLength callback; the
  stream, loggers, checkpoints and progress bar are off.
* bare: for each batch, forward, mean cross-entropy, backward, clip, AdamW step, scheduler step.

Each side warms up, then is timed over `--steps` steps; the sides alternate `--repeats` times.
Prints tokens/s of each and the ratio prequel / bare (target ≥ 0.95).

    python bench/step_overhead.py [--steps 300] [--config configs/small.yaml] [--model.n_layer 4 ...]
"""

from common import (
    bare_tokens_per_s,
    bench_config,
    bench_parser,
    code_length_callback,
    corpus_prefix,
    lightning_tokens_per_s,
    median,
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

    prequel, bare = [], []
    print(f"{'repeat':>6} {'prequel tok/s':>14} {'bare tok/s':>12} {'ratio':>7}")
    for r in range(args.repeats):
        callbacks = [code_length_callback(config, tokenizer, len(tokens))]
        prequel.append(lightning_tokens_per_s(config, tape, tokenizer.vocab_size, callbacks, args.warmup))
        bare.append(bare_tokens_per_s(config, tape, tokenizer.vocab_size, args.warmup))
        print(f"{r + 1:>6} {prequel[-1]:>14,.0f} {bare[-1]:>12,.0f} {prequel[-1] / bare[-1]:>7.3f}")
    print(f"{'median':>6} {median(prequel):>14,.0f} {median(bare):>12,.0f} {median(prequel) / median(bare):>7.3f}")
    print(f"{'best':>6} {max(prequel):>14,.0f} {max(bare):>12,.0f} {max(prequel) / max(bare):>7.3f}")
    print(f"\nthroughput ratio prequel / bare (medians): {median(prequel) / median(bare):.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
