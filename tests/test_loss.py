"""The loss and the probabilities it codes with (training/loss.py): the chunked head equal to the
whole-batch one where it must be, and a stream of a chunked run decoded in another process."""

import pytest
import torch
import torch.nn.functional as F

from prequel.alice.session import train
from prequel.checks.settings import ConfigError, load_config
from prequel.models.gpt import GPT, GPTConfig
from prequel.training.coding import target_intervals
from prequel.training.loss import HeadNLL, SoftmaxNLL, softmax_nll
from tests.helpers import ROOT, run_cli, tiny_config

N, C, V = 300, 32, 500


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = -100  # no token there
    return h, w, targets


def _grads(loss_of, h, w):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    nll, spans = loss_of(h, w)
    nll.sum().backward()
    return nll.detach(), spans, h.grad, w.grad


def _whole(targets):
    def loss_of(h, w):
        nll, probs = SoftmaxNLL.apply(F.linear(h, w).float(), targets, targets != -100)  # (no IGNORE here)
        return nll, target_intervals(probs, targets)  # (before the backward reuses probs)

    return loss_of


def test_one_chunk_gives_the_whole_batch_bits_loss_intervals_and_gradients(batch):
    h, w, targets = batch
    chunked = _grads(lambda h, w: HeadNLL.apply(h, w, targets, N, True), h, w)
    for got, want in zip(chunked, _grads(_whole(targets), h, w)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("rows", [64, 7])
def test_chunks_give_the_whole_batch_loss_and_gradients_up_to_rounding(batch, rows):
    h, w, targets = batch
    nll, spans, gh, gw = _grads(lambda h, w: HeadNLL.apply(h, w, targets, rows, True), h, w)
    want_nll, want_spans, want_gh, want_gw = _grads(_whole(targets), h, w)
    torch.testing.assert_close(nll, want_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, want_gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, want_gw, rtol=1e-4, atol=1e-5)
    assert (spans[:, 1] >= 1).all() and (spans.sum(1) <= 2**31).all()  # (bitwise: the next test)


def test_the_decoders_logits_are_the_training_steps_bit_for_bit():
    """Bob's forward (GPT.forward, chunked the same way) gives each row's softmax exactly the
    probabilities Alice's HeadNLL coded with: equal intervals, equal NLL."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, block_size=24, n_layer=1, n_head=2, n_embd=32, head="norm", head_chunk=40))
    idx = torch.randint(0, 301, (5, 24))
    targets = torch.randint(0, 300, (5, 20))
    with torch.no_grad():
        h = model.features(idx, first=4).flatten(0, 1)
        nll, spans = HeadNLL.apply(h, model.output_weight, targets.flatten(), 40, True)
        logits = model(idx, first=4).flatten(0, 1)  # 100 rows: chunks of 40, 40, 20
    bob_nll, probs, _, _ = softmax_nll(logits.float(), targets.flatten())
    assert torch.equal(bob_nll, nll)
    assert torch.equal(target_intervals(probs, targets.flatten()), spans)


def test_the_gpu_way_to_a_finite_nll_gives_the_hosts_values():
    logits = torch.randn(64, V, generator=torch.Generator().manual_seed(1)) * 40  # many p < 1e-30
    targets = torch.randint(0, V, (64,), generator=torch.Generator().manual_seed(2))
    host, _, _, _ = softmax_nll(logits, targets, sync_free=False)
    device, _, _, _ = softmax_nll(logits, targets, sync_free=True)
    assert (host > 69).sum() > 5 and torch.isfinite(device).all()
    torch.testing.assert_close(device, host, rtol=1e-6, atol=1e-4)


def test_bf16_autocast_recomputes_each_chunk_as_its_forward(batch):
    h, w, targets = batch
    with torch.autocast("cpu", torch.bfloat16):
        nll, _, gh, gw = _grads(lambda h, w: HeadNLL.apply(h, w, targets, 64, False), h, w)
    want_nll, _, want_gh, want_gw = _grads(_whole(targets), h, w)
    torch.testing.assert_close(nll, want_nll, rtol=0.05, atol=0.3)
    assert (
        gh.dtype == torch.float32 and torch.nn.functional.cosine_similarity(gw.flatten(), want_gw.flatten(), 0) > 0.99
    )


def test_a_chunked_run_with_context_decodes_in_another_process(tmp_path):
    text = tmp_path / "text.txt"
    text.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:3000])
    run_dir = tmp_path / "run"
    summary = train(tiny_config(text, run_dir, "--model.head_chunk", "48", "--data.context", "4"))
    assert summary["code/n_bits"] == 3000
    out = tmp_path / "out.txt"
    r = run_cli("verify", run_dir, "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == text.read_bytes()


@pytest.mark.parametrize("clash", [["--model.ngram_order", "2"], ["--model.z_loss", "1e-4"]])
def test_head_chunk_refuses_what_needs_the_whole_logits(tmp_path, clash):
    with pytest.raises(ConfigError, match=f"model.head_chunk .* does not combine with {clash[0][2:]}"):
        tiny_config(tmp_path / "x.txt", tmp_path / "run", "--model.head_chunk", "48", *clash)


def test_the_gpt2_small_preset_trains_as_a_two_layer_shrink_on_cpu(tmp_path):
    """configs/gpt2-small.yaml as shipped but 2 layers, on the CPU in fp32 without compile, on
    bundled text: 3 steps of 3 × 1024 tokens (2 chunks of the head each), stream on."""
    text = tmp_path / "text.txt"
    text.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:200_000])
    shrink = {
        "model.n_layer": 2,
        "data.path": text,
        "data.vocab_size": 2048,
        "data.batch_size": 3,
        "trainer.accelerator": "cpu",
        "trainer.precision": "32-true",
        "trainer.compile": "false",
        "trainer.num_threads": 2,
        "trainer.max_steps": 3,
        "logging.wandb": "false",
        "logging.progress_bar": "false",
        "logging.plot": "false",
        "run_dir": tmp_path / "run",
    }
    config = load_config(
        ROOT / "configs" / "gpt2-small.yaml", [a for k, v in shrink.items() for a in (f"--{k}", str(v))]
    )
    assert (config.model.n_embd, config.model.block_size, config.model.head_chunk) == (768, 1024, 2048)
    summary = train(config)
    assert summary["code/n_bits"] == 3 * 3 * 1024
    assert (tmp_path / "run" / "stream.prequel").stat().st_size > 0
