import json

import pytest
import torch
from torch import nn

from nodata_defense._training import LoopSettings, learning_rate_at, train_loop


def _problem(weight_seed: int = 0):
    data_rng = torch.Generator().manual_seed(0)
    data = torch.randn(64, 4, generator=data_rng)
    labels = torch.randint(0, 3, (64,), generator=data_rng)
    torch.manual_seed(weight_seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 3))

    def compute_loss(generator: torch.Generator):
        index = torch.randint(0, 64, (16,), generator=generator)
        loss = nn.functional.cross_entropy(model(data[index]), labels[index])
        return {"loss": loss, "ce": loss}

    return model, compute_loss


def _trainable(model):
    return dict(model.named_parameters())


def test_loss_decreases_and_history_has_every_step():
    model, compute_loss = _problem()
    settings = LoopSettings(steps=60, learning_rate=0.05, seed=1)
    result = train_loop(_trainable(model), compute_loss, settings)
    assert len(result.loss_history) == 60
    first = sum(h["loss"] for h in result.loss_history[:10]) / 10
    last = sum(h["loss"] for h in result.loss_history[-10:]) / 10
    assert last < first


def test_interrupted_then_resumed_run_is_bit_identical(tmp_path):
    settings = LoopSettings(steps=12, learning_rate=0.05, seed=3, checkpoint_every=5, gradient_accumulation=2)
    reference, loss_ref = _problem()
    train_loop(_trainable(reference), loss_ref, settings)

    interrupted, loss_int = _problem()
    calls = {"n": 0}

    def crashing(generator):
        calls["n"] += 1
        if calls["n"] > 15:  # 7 full steps (2 micro-batches each) then a crash inside step 8
            raise KeyboardInterrupt
        return loss_int(generator)

    with pytest.raises(KeyboardInterrupt):
        train_loop(_trainable(interrupted), crashing, settings, checkpoint_dir=tmp_path, run_id="r")
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 5
    assert not list(tmp_path.glob(".checkpoint-*"))

    resumed, loss_res = _problem(
        weight_seed=99
    )  # different initial weights: the checkpoint must overwrite them
    result = train_loop(_trainable(resumed), loss_res, settings, checkpoint_dir=tmp_path, run_id="r")
    assert result.resumed_from_step == 5 and len(result.loss_history) == 12
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_resume_refuses_a_different_run(tmp_path):
    model, compute_loss = _problem()
    train_loop(
        _trainable(model),
        compute_loss,
        LoopSettings(steps=2, learning_rate=0.01, seed=0),
        checkpoint_dir=tmp_path,
        run_id="a",
    )
    with pytest.raises(ValueError, match=r"`checkpoint_dir` .* holds a checkpoint of a different run"):
        train_loop(
            _trainable(model),
            compute_loss,
            LoopSettings(steps=2, learning_rate=0.01, seed=0),
            checkpoint_dir=tmp_path,
            run_id="b",
        )


def test_learning_rate_schedule():
    s = LoopSettings(steps=100, learning_rate=1.0, seed=0, warmup_steps=10)
    assert learning_rate_at(0, s) == pytest.approx(0.1)
    assert learning_rate_at(10, s) == pytest.approx(1.0)
    assert learning_rate_at(100, s) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate_at(55, s) == pytest.approx(0.5)


def test_empty_trainable_is_refused():
    with pytest.raises(ValueError, match=r"`trainable` is empty"):
        train_loop({}, lambda g: {}, LoopSettings(steps=1, learning_rate=0.1, seed=0))
