"""prequel: train GPT language models with Lightning and report their loss as a prequential code length.

The package's parts (each subpackage's docstring says more):

* f, what Bob runs to decode a stream, and so what |f| counts: `prequel.models` (the GPT),
  `prequel.training` (the training step, data plan, coder and stream format both sides run) and
  `prequel.callbacks` (the stream callbacks; `CodeLength` and the module contract beside them report
  and check only). In the repository they are the top-level folders models/, training/, callbacks/.
* Alice's side: `prequel.alice` (reading the corpus, tokenizing, training with the stream on).
* `prequel.checks`: what decides whether to run or decode (settings, memory, header, machine).
* `prequel.verify`: decoding a stream and checking it; the parallel audit.
* `prequel.compress`: any file with a frozen trained model.
* `prequel.reports`: summaries, size sweeps, prefix code lengths.
* `prequel.program`: f itself, |f| and the code hash.

This file is part of f (every decoder imports it), so it imports nothing.
"""
