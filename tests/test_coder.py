"""The coder alone: the quantisation's definition and its fused CPU form agree, every symbol stays
codable, the cost is within a thousandth of a bit a token of the ideal, and bad words are refused."""

import math

import numpy as np
import pytest
import torch

from prequel.alice.encoder import Encoder, encode_known
from prequel.training.coding import Decoder, P, _interval, code_batch, frequencies, intervals, logit_intervals, lookup
from prequel.training.data import IGNORE
from prequel.training.loss import SoftmaxNLL
from prequel.training.stream import StreamError
from tests.test_stream import fixed_batch, round_trip


def hard_rows() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [
        torch.softmax(torch.randn(50, 256, generator=g) * 5, -1),  # ordinary
        torch.softmax(torch.randn(4, 131072, generator=g), -1),  # the widest vocabulary
        torch.softmax(torch.randn(30, 50257, generator=g) * 4, -1),  # GPT-2's
        torch.nn.functional.one_hot(torch.arange(7), 7).float(),  # all mass on one symbol
        torch.softmax(torch.randn(20, 2, generator=g), -1),  # two symbols
        torch.softmax(torch.randn(30, 60, generator=g) * 40, -1),  # nearly sure
        torch.softmax(torch.randn(20, 300, generator=g), -1) * 1.01,  # summing to more than 1 ...
        torch.softmax(torch.randn(20, 300, generator=g), -1) * 1.5,  # ... by more than the largest gives back
        torch.full((3, 64), float("nan")),  # a diverged model still codes
    ]


def test_the_fused_cpu_quantisation_gives_the_definitions_integers():
    """`intervals`/`lookup` on a CPU tensor run one numba pass; on another device, `frequencies` in torch ops."""
    g = torch.Generator().manual_seed(4)
    for probs in hard_rows():
        freq = frequencies(probs)
        symbols = torch.randint(0, probs.shape[-1], (len(probs),), generator=g)
        assert torch.equal(intervals(probs, symbols), torch.stack(_interval(freq, symbols), -1))
        slots = torch.randint(0, 1 << P, (len(probs),), generator=g)
        found = torch.searchsorted(freq.cumsum(-1), slots[:, None], right=True)[:, 0]
        assert torch.equal(lookup(probs, slots), torch.stack((found, *_interval(freq, found)), -1))


def test_frequencies_sum_to_the_total_and_keep_every_symbol_codable():
    rows = hard_rows()
    for probs in rows:
        freq = frequencies(probs)
        assert (freq.long().sum(-1) == 1 << P).all() and (freq >= 1).all()
    for probs in rows[:2]:  # what the quantisation costs: KL(p || q) < -log2(1 - W / 2**P) (+ float rounding)
        p, q = probs.double(), frequencies(probs).double() / 2**P
        assert ((p * (p / q).log2()).sum(-1) < -math.log2(1 - probs.shape[-1] / 2**P) + 1e-6).all()


def test_coder_cost_is_close_to_the_ideal_and_every_symbol_is_codable():
    logits = torch.full((1, 1000, 256), -1e4)
    logits[..., 7] = 0.0  # the model is sure of 7 ...
    targets = torch.randint(0, 256, (1, 1000), generator=torch.Generator().manual_seed(1))
    targets[0, :990] = 7  # ... and wrong ten times: those still code (each symbol keeps a frequency)
    encoder = round_trip(logits, targets)
    assert encoder.num_bits() <= 10 * P + 64  # ≤ 31 bits per surprise, ~0 for the rest, 64 for the state


@pytest.mark.parametrize("vocab, rows, cols", [(256, 64, 1024), (50257, 8, 64)])
def test_stream_minus_ideal_is_within_a_thousandth_of_a_bit_a_token_plus_padding(vocab, rows, cols):
    g = torch.Generator().manual_seed(vocab)
    encoder, ideal = Encoder(), 0.0
    for _ in range(4):  # four batches into one segment
        logits = torch.randn(rows, cols, vocab, generator=g) * 3
        probs = torch.softmax(logits, -1)
        targets = torch.multinomial(probs.flatten(0, 1), 1, generator=g).view(rows, cols)
        ideal += -probs.gather(-1, targets[..., None]).double().log2().sum().item()
        encode_known(logit_intervals(logits.flatten(0, 1), targets.flatten()).view(rows, cols, 2), targets, encoder)
    n = 4 * rows * cols
    assert encoder.num_bits() - ideal <= 1e-3 * n + 64 * encoder.lanes


def test_decoder_refuses_words_that_cannot_be_a_segment():
    logits, targets = fixed_batch()
    encoder = round_trip(logits, targets)
    words = encoder.words()
    decoded = torch.where(targets == IGNORE, IGNORE, 0)
    with pytest.raises(StreamError, match="the payload ran out"):
        code_batch(lambda t: logits[:, t], decoded, Decoder(words[:-4], 3))
    with pytest.raises(StreamError, match="a lane's state is out of range"):
        Decoder(np.concatenate([[0x8000], words[1:]]), 3)  # a state of 2**63 or more
    with pytest.raises(StreamError, match="cannot hold the states of 3 lanes"):
        Decoder(words[:5], 3)
    with pytest.raises(StreamError, match="row for lane 2, but the segment codes 2 lanes"):
        code_batch(lambda t: logits[:, t], decoded.clone(), Decoder(words, 2))


def test_the_steps_softmax_nll_is_cross_entropy_with_its_gradient():
    """training_step's loss: one softmax for the loss, its backward and the stream (SoftmaxNLL)."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(40, 300, generator=g) * 8).requires_grad_()
    logits.data[3, 7] = 200.0  # row 3 is sure of 7 and its target is elsewhere: p underflows
    targets = torch.randint(0, 300, (40,), generator=g)
    targets[[1, 5]] = IGNORE
    nll, probs = SoftmaxNLL.apply(logits, targets, targets != IGNORE)
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")
    assert torch.equal(probs, torch.softmax(logits.detach(), -1))  # what code_batch codes a column with
    assert torch.isfinite(nll).all() and nll[3] > 100 and (nll[[1, 5]] == 0).all()
    assert torch.allclose(nll, expected, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad((nll * torch.arange(40.0)).sum(), logits)
    (want,) = torch.autograd.grad((expected * torch.arange(40.0)).sum(), logits)
    assert torch.allclose(grad, want, atol=1e-5)
