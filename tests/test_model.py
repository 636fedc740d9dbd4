import pytest
import torch
import torch.nn.functional as F

from prequel.alice.session import train
from prequel.models.gpt import GPT, HASH_BITS, GPTConfig
from prequel.models.kv_cache import KVCache
from prequel.models.ngram import NGramPrior
from tests.helpers import tiny_config

CFG = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, head="norm")


def test_norm_head_uses_unit_rows_and_leaves_the_parameter_alone():
    torch.manual_seed(0)
    model = GPT(CFG)
    idx = torch.randint(0, 51, (2, 16))
    stored = model.head_weight.detach().clone()
    hidden = {}
    model.ln_f.register_forward_hook(lambda m, i, o: hidden.setdefault("h", o))
    logits = model(idx)
    logits.sum().backward()
    unit_rows = stored / stored.norm(dim=1, keepdim=True)
    torch.testing.assert_close(logits, hidden["h"] @ unit_rows.T)
    assert torch.equal(model.head_weight.detach(), stored), "forward must not normalise the parameter in place"
    # Rescaling any output row leaves the logits unchanged: only its direction counts.
    with torch.no_grad():
        model.head_weight.mul_(torch.rand(CFG.vocab_size, 1) * 5 + 0.1)
    torch.testing.assert_close(model(idx), logits)


def test_linear_head_is_sensitive_to_row_scale():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**CFG.__dict__, "head": "linear"}))
    idx = torch.randint(0, 51, (2, 16))
    before = model(idx)
    with torch.no_grad():
        model.head_weight.mul_(3.0)
    assert not torch.allclose(model(idx), before)


def test_tied_embeddings_are_one_tensor_counted_once():
    tied = GPT(CFG)
    untied = GPT(GPTConfig(**{**CFG.__dict__, "tie_embeddings": False}))
    assert tied.head_weight.data_ptr() == tied.wte.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == CFG.vocab_size * CFG.n_embd
    assert tied.num_params() == sum(p.numel() for p in {id(p): p for p in tied.parameters()}.values())


def test_tied_weights_stay_tied_through_training_and_checkpoint(text_file, tmp_path):
    config = tiny_config(text_file, tmp_path / "run", "--trainer.max_steps", "3", "--stream.enabled", "false")
    train(config)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert not any("lm_head" in k for k in state), "a tied model stores one matrix"
    fresh = GPT(GPTConfig(**{**config.model.__dict__, "vocab_size": 256}))
    fresh.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    assert fresh.head_weight.data_ptr() == fresh.wte.weight.data_ptr()
    # A step on the restored model moves embedding and head together (they are one tensor).
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    logits = fresh(torch.randint(0, 257, (2, 8)))
    F.cross_entropy(logits.flatten(0, 1), torch.randint(0, 256, (16,))).backward()
    opt.step()
    assert fresh.head_weight.data_ptr() == fresh.wte.weight.data_ptr()
    assert torch.equal(fresh.head_weight, fresh.wte.weight[:256])
    assert not torch.equal(fresh.wte.weight, state["model.wte.weight"])


def test_ngram_prior_counts_only_coded_first_pass_tokens(text_file, tmp_path):
    config = tiny_config(
        text_file,
        tmp_path / "run",
        "--model.ngram_order",
        "3",
        "--stream.enabled",
        "false",
        "--trainer.max_epochs",
        "2",
        "--data.replay_steps",
        "1",
    )
    summary = train(config)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]
    prior = NGramPrior(vocab_size=256, max_order=3, hash_bits=HASH_BITS)  # the checkpoint holds the counts sparsely
    prior.load_state_dict({k.removeprefix("model.ngram."): v for k, v in state.items() if k.startswith("model.ngram.")})
    for k in (1, 2, 3):  # each coded token counted once per order: not per epoch, not per replay
        assert getattr(prior, f"counts{k}").sum() == summary["data/tokens"] == 4000
    # the order-1 counts are exactly the bigram table of the text (with BOS at chunk starts)
    data = text_file.read_bytes()
    assert prior.counts1[ord("e"), ord(" ")] == sum(
        1 for i in range(1, len(data)) if data[i - 1 : i + 1] == b"e " and i % 32 != 0
    )


def test_ngram_counts_round_trip_sparsely_and_refuse_what_does_not_fit():
    prior = NGramPrior(vocab_size=256, max_order=6, hash_bits=HASH_BITS)
    idx = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    prior.update(idx, idx.roll(-1, 1), -100)
    state = prior.state_dict()
    dense_bytes = sum(t.numel() * t.element_size() for t in prior.buffers())
    assert sum(t.numel() * t.element_size() for t in state.values()) < dense_bytes / 1000  # 256 tokens in 165 MB
    again = NGramPrior(vocab_size=256, max_order=6, hash_bits=HASH_BITS)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(prior.buffers(), again.buffers()))
    with pytest.raises(RuntimeError, match="Missing key"):
        again.load_state_dict({})
    forged = dict(state, counts2_index=torch.tensor([1 << 30], dtype=torch.int32), counts2_value=torch.ones(1))
    with pytest.raises(RuntimeError, match="counts2: sparse counts do not fit"):
        again.load_state_dict(forged)


def test_forward_step_matches_forward_with_ngram_prior():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**CFG.__dict__, "ngram_order": 3}))
    idx = torch.randint(0, 51, (3, 16))
    with torch.no_grad():
        model.ngram.update(idx, torch.randint(0, 50, (3, 16)), -100)
        full = model(idx)
    cache = KVCache(model.config, 3)
    steps = torch.stack([model.forward_step(idx[:, t], cache) for t in range(16)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)
    assert not torch.equal(full, GPT(CFG)(idx)), "the prior changes the prediction"


def test_ngram_leave_out_sees_the_counts_as_before_the_tokens_were_counted():
    prior = NGramPrior(vocab_size=50, max_order=3, hash_bits=HASH_BITS)
    history = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(0))
    prior.update(history, history.roll(-1, 1), -100)
    idx = torch.arange(16)[None] * 3 % 50  # 16 distinct contexts of every order
    targets = torch.randint(0, 50, (1, 16))
    targets[0, -1] = -100  # padding: nothing to leave out
    before = prior(idx)
    prior.update(idx, targets, -100)
    assert not torch.allclose(prior(idx), before)  # counting changed the prediction ...
    torch.testing.assert_close(prior(idx, leave_out=targets), before)  # ... leaving it out restores it
