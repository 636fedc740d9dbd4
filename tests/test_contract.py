"""The callbacks' contract (callbacks/contract.py): any causal LM gets a code length; what is missing is named."""

import importlib.util
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from prequel.alice.encoder import StreamEncoder
from prequel.callbacks.code_length import CodeLength
from prequel.callbacks.contract import ContractError, StreamCoded, StreamModule, members
from prequel.checks.settings import load_config
from prequel.training.data import Tape
from prequel.training.module import CodedBatch, PrequelModule
from tests.helpers import ROOT, TINY

TEXT = (ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:6000]


def example():
    """examples/own_lm.py, imported as a user's module would be."""
    spec = importlib.util.spec_from_file_location("own_lm", ROOT / "examples" / "own_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LossBits(L.Callback):
    """Σ by another road: the mean loss `training_step` returned, times its token count, in bits."""

    def __init__(self):
        self.bits, self.tokens = 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tokens = int((batch[1] != -100).sum())
        self.bits += float(outputs["loss"]) * tokens / math.log(2)
        self.tokens += tokens


def fit(module, callbacks, tmp_path, max_epochs=1):
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="csv", version=""),
        callbacks=callbacks,
        log_every_n_steps=5,
        enable_checkpointing=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    own = example()
    trainer.fit(module, DataLoader(own.byte_chunks(TEXT, 32), batch_size=8, shuffle=False))
    return trainer


def test_the_examples_own_module_gets_its_code_length_through_code_length(tmp_path):
    own = example()
    code_length, check = CodeLength({"source": 1000}, total_tokens=len(TEXT)), LossBits()
    fit(own.ByteLSTM(width=32), [code_length, check], tmp_path, max_epochs=2)
    t = code_length.totals()
    assert t["tokens"] == check.tokens // 2 == len(TEXT) and t["nbytes"] == len(TEXT) and t["complete"]
    # Σ is the first epoch's summed NLL only (the second is a later pass, never code length)
    first_epoch_bits = sum(bits for _, bits, _ in code_length.curve)
    assert t["data_bits"] == pytest.approx(first_epoch_bits, rel=1e-12)
    assert t["data_bits"] < check.bits  # both epochs' bits ...
    assert t["data_bits"] == pytest.approx(check.bits - t["last_epoch_bpb"] * len(TEXT), rel=1e-5)  # ... less the 2nd
    assert 4.0 < t["data_bits"] / len(TEXT) < 8.5  # an LSTM's first pass over 6 kB: near the byte rate
    logged = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"code/bpb", "code/data_bpb", "code/total_bits"} <= set(logged)


def test_one_epochs_code_length_equals_the_summed_loss_in_bits(tmp_path):
    own = example()
    code_length, check = CodeLength({"source": 1000}, total_tokens=len(TEXT)), LossBits()
    fit(own.ByteLSTM(width=32), [code_length, check], tmp_path)
    assert code_length.totals()["data_bits"] == pytest.approx(check.bits, rel=1e-5)
    assert code_length.totals()["tokens"] == check.tokens == len(TEXT)


class NoCoded(L.LightningModule):
    """A module that never heard of the contract."""

    def __init__(self):
        super().__init__()
        self.lstm = example().ByteLSTM(width=8)

    def training_step(self, batch, batch_idx):
        return self.lstm.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return self.lstm.configure_optimizers()


def test_a_module_without_coded_is_refused_before_training_naming_it(tmp_path):
    with pytest.raises(ContractError) as e:
        fit(NoCoded(), [CodeLength({}, total_tokens=len(TEXT))], tmp_path)
    assert "CodeLength needs NoCoded to have coded" in str(e.value)
    assert "CodeLengthModule" in str(e.value) and len(str(e.value).splitlines()) == 1


def test_coded_without_the_fields_code_length_reads_is_refused_naming_them(tmp_path):
    own = example()

    class HalfCoded(own.ByteLSTM):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.coded = type("Partial", (), {"nll": self.coded.nll, "mask": self.coded.mask})()
            return loss

    with pytest.raises(ContractError, match=r"CodeLength needs HalfCoded.coded to have nbytes, fresh, first_pass"):
        fit(HalfCoded(width=8), [CodeLength({}, total_tokens=len(TEXT))], tmp_path)

    class NeverSets(own.ByteLSTM):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.coded = None
            return loss

    with pytest.raises(ContractError, match="training_step left NeverSets.coded None"):
        fit(NeverSets(width=8), [CodeLength({}, total_tokens=len(TEXT))], tmp_path)


def test_the_stream_needs_more_and_names_what_a_foreign_module_lacks(tmp_path):
    own = example()
    encoder = StreamEncoder(Tape(torch.zeros(10, dtype=torch.long), 256), 5, header={})
    with pytest.raises(ContractError) as e:
        fit(own.ByteLSTM(width=8), [encoder], tmp_path)
    assert "StreamEncoder needs ByteLSTM to have tape, is_mixture, model, is_first_pass" in str(e.value)


def test_prequel_module_implements_the_whole_stream_contract():
    module = PrequelModule(load_config(TINY), vocab_size=256)
    assert [name for name in members(StreamModule) if not hasattr(module, name)] == []
    fields = set(CodedBatch.__dataclass_fields__) | {"mask"}  # (mask is a property)
    assert set(members(StreamCoded)) <= fields
