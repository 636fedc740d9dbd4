"""Bob's fast path (prequel/verify/fast_decode.py): single steps with the full forward's bits, checked, a way back."""

import pytest
import torch

from prequel.alice.session import train
from prequel.models.gpt import GPT, GPTConfig
from prequel.verify import fast_decode
from prequel.verify.fast_decode import ExactSteps, torch_threads
from prequel.verify.verifier import verify
from tests.helpers import tiny_config


def _model(config: GPTConfig) -> GPT:
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():  # away from the initialisation, so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if model.ngram is not None:
            for k in range(1, config.ngram_order + 1):
                counts = getattr(model.ngram, f"counts{k}")
                counts.copy_(torch.randint(0, 3, counts.shape).float())
    return model


@pytest.mark.parametrize(
    "config, batch, faithful",
    [
        (GPTConfig(block_size=64, n_embd=64, n_head=4), 8, False),  # 64 positions: two flash blocks
        (GPTConfig(block_size=40, n_embd=64, n_head=2, positions="rope", ngram_order=3, ngram_hash_bits=10), 4, False),
        (GPTConfig(block_size=40, n_embd=64, n_head=2, head="norm", ngram_order=2, ngram_hash_bits=10), 3, True),
    ],
    ids=["learned", "rope-ngram", "flash-block"],
)
def test_steps_give_the_full_forwards_bits(config, batch, faithful):
    """Every position's logits, stepped one at a time after a known context, equal the full forward's."""
    model = _model(config)
    idx = torch.randint(0, config.vocab_size + 1, (batch, config.block_size))
    with torch.no_grad():
        full = model(idx)
        steps = ExactSteps(model, batch, config.block_size, torch.get_num_threads())
        if faithful:  # the fallback when no smaller query block rounds alike: the flash block itself
            steps.query_rows = None
        context = 5
        with torch_threads(1):
            for at in range(0, context, steps.max_positions):  # (portable products: one position a step)
                steps.step(idx[:, at : min(at + steps.max_positions, context)], logits=False)
            stepped = torch.cat([steps.step(idx[:, t : t + 1]) for t in range(context, config.block_size)], dim=1)
    assert torch.equal(stepped, full[:, context:])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    text = root / "text.txt"
    text.write_bytes(open("data/tinyshakespeare.txt", "rb").read()[:3000])
    summary = train(
        tiny_config(
            text, root / "run", "--model.ngram_order", "2", "--data.context", "3", "--data.curriculum", "strided"
        )
    )
    return root / "run", text, summary


def test_verify_decodes_every_batch_by_steps_and_f_alone_decodes_the_same(run):
    run_dir, text, summary = run
    fast = verify(run_dir, run_dir / "fast.txt")
    assert fast["fast_batches"] > 0 and fast["slow_batches"] == 0
    slow = verify(run_dir, run_dir / "slow.txt", fast=False)
    assert slow["fast_batches"] == slow["slow_batches"] == 0
    assert (run_dir / "fast.txt").read_bytes() == (run_dir / "slow.txt").read_bytes() == text.read_bytes()


@pytest.mark.parametrize(
    "wrong",
    [
        lambda out: torch.nextafter(out, torch.full_like(out, float("inf"))),  # one ulp: the same symbols, mostly
        torch.zeros_like,  # uniform: other symbols, or words that do not decode at all
    ],
    ids=["ulp", "uniform"],
)
def test_a_batch_whose_steps_round_differently_is_decoded_again_by_f(run, monkeypatch, wrong):
    """Steps that miss the full forward's bits in every other batch: the check (or the range decoder) catches
    each such batch, the range decoder goes back to where the batch began, and f's procedure decodes it."""
    run_dir, text, summary = run
    step, batches_seen = ExactSteps.step, []

    def off_by_an_ulp(self, ids, logits=True):
        if not hasattr(self, "batch_index"):  # a new batch
            self.batch_index = len(batches_seen)
            batches_seen.append(self)
        out = step(self, ids, logits)
        return wrong(out) if out is not None and self.batch_index % 2 else out

    monkeypatch.setattr(fast_decode.ExactSteps, "step", off_by_an_ulp)
    report = verify(run_dir, run_dir / "mixed.txt")
    batches = report["slow_batches"] + report["fast_batches"]
    assert batches > 2 and report["slow_batches"] == batches // 2 and report["fast_batches"] == batches - batches // 2
    assert (run_dir / "mixed.txt").read_bytes() == text.read_bytes()
    assert report["final_weights_equal_checkpoint"] is True
