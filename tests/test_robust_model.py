"""RobustModel: forward / predict / certify, the saved file set, save → load identity, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from robust_fixtures import CLASS_NAMES, assemble, images, save_tiny_t2i, without_time
from tiny_models import TinyCNN

from nodata_defense.config import FORMAT_VERSION, RobustModelConfig
from nodata_defense.robust_model import RobustModel
from nodata_defense.smoothing import ABSTAIN

# Saved files per adaptation mode (the exact set; nothing else may be written).
CORE = {
    "README.md",
    "config.json",
    "denoiser_lora/adapter_config.json",
    "denoiser_lora/adapter_model.safetensors",
}
ADAPTER = {
    "full": {
        "classifier_adapter/classifier_adapter.json",
        "classifier_adapter/classifier_adapter.safetensors",
    },
    "head": {
        "classifier_adapter/classifier_adapter.json",
        "classifier_adapter/classifier_adapter.safetensors",
    },
    "lora": {
        "classifier_adapter/classifier_adapter.json",
        "classifier_adapter/adapter_config.json",
        "classifier_adapter/adapter_model.safetensors",
    },
    "none": set(),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def t2i_dir(tmp_path_factory) -> Path:
    return save_tiny_t2i(tmp_path_factory.mktemp("t2i"))


@pytest.fixture(scope="module")
def robust(t2i_dir) -> RobustModel:
    return assemble(t2i_dir, TinyCNN(), "full")


def saved_files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------------- inference
def test_forward_returns_differentiable_logits_for_one_noise_draw(robust):
    x = images(3).requires_grad_(True)
    logits = robust(x, generator=torch.Generator().manual_seed(0))
    assert logits.shape == (3, len(CLASS_NAMES))
    logits.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
    again = robust(x.detach(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, logits.detach())


def test_predict_and_certify_return_typed_results(robust):
    x = images(2)
    predictions = robust.predict(x, n=40, alpha=0.01, batch_size=32, generator=0)
    certificates = robust.certify(x, n0=10, n=40, alpha=0.01, batch_size=32, generator=0)
    assert len(predictions) == len(certificates) == 2
    for p, c in zip(predictions, certificates, strict=True):
        assert p.label == ABSTAIN or 0 <= p.label < 3
        assert c.sigma == 0.25 and c.n == 40 and c.n0 == 10
        assert (c.label == ABSTAIN and c.radius == 0.0) or (0 <= c.label < 3 and c.radius > 0)


def test_certify_at_another_sigma_warns_and_uses_it(robust):
    with pytest.warns(UserWarning, match="personalized and adapted for sigma=0.25"):
        (certificate,) = robust.certify(images(1), sigma=0.5, n0=5, n=20, generator=0)
    assert certificate.sigma == 0.5


def test_repr_shows_the_settings(robust):
    text = repr(robust)
    for part in ("sigma=0.25", "'zero'", "kind=text", "personalized=True", "adaptation='full'", "TinyCNN"):
        assert part in text


@pytest.mark.parametrize(
    ("x", "error", "message"),
    [
        (torch.rand(1, 3, 16, 16), ValueError, r"must have 1 channel\(s\)"),
        (torch.rand(1, 1, 16, 16) * 255, ValueError, r"pixel values in \[0, 1\]"),
        (torch.rand(1, 16, 16), ValueError, "4 dimensions"),
        (torch.zeros(1, 1, 16, 16, dtype=torch.uint8), TypeError, "floating-point"),
        ([[0.5]], TypeError, "torch.Tensor"),
    ],
    ids=["channels", "range", "rank", "dtype", "type"],
)
def test_bad_images_are_refused(robust, x, error, message):
    with pytest.raises(error, match=message):
        robust.certify(x, n0=2, n=2)
    with pytest.raises(error, match=message):
        robust(x)


def test_constructor_validates_its_arguments(robust):
    classifier, denoiser = robust.classifier, robust.denoiser
    with pytest.raises(TypeError, match="`denoiser` must be a DiffusionDenoiser"):
        RobustModel(classifier, object(), sigma=0.25, class_names=CLASS_NAMES)
    with pytest.raises(ValueError, match="`sigma` must be a finite number > 0"):
        RobustModel(classifier, denoiser, sigma=0.0, class_names=CLASS_NAMES)
    with pytest.raises(ValueError, match="distinct"):
        RobustModel(classifier, denoiser, sigma=0.25, class_names=["a", "a", "b"])
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        RobustModel(lambda x: x, denoiser, sigma=0.25, class_names=CLASS_NAMES)
    with pytest.raises(ValueError, match="returns 3 logits but 4 class names"):
        RobustModel(TinyCNN(), denoiser, sigma=0.25, class_names=[*CLASS_NAMES, "three"])


# -------------------------------------------------------------------------------- save / load
def test_save_then_load_gives_identical_results(robust, tmp_path):
    robust.save_pretrained(tmp_path / "saved")
    assert saved_files(tmp_path / "saved") == CORE | ADAPTER["full"]
    loaded = RobustModel.from_pretrained(tmp_path / "saved", classifier=TinyCNN())
    x = images(2, seed=5)
    assert without_time(loaded.certify(x, n0=10, n=60, generator=3)) == without_time(
        robust.certify(x, n0=10, n=60, generator=3)
    )
    assert loaded.predict(x, n=30, generator=4) == robust.predict(x, n=30, generator=4)
    assert loaded.config == robust.config
    assert repr(loaded) == repr(robust)


@pytest.mark.parametrize("mode", ["lora", "head", "none"])
def test_each_adaptation_mode_saves_its_files_and_reloads(t2i_dir, tmp_path, mode):
    model = assemble(t2i_dir, TinyCNN(), mode)
    model.save_pretrained(tmp_path / mode)
    assert saved_files(tmp_path / mode) == CORE | ADAPTER[mode]
    loaded = RobustModel.from_pretrained(tmp_path / mode, classifier=TinyCNN())
    x = images(2, seed=1)
    torch.testing.assert_close(
        loaded(x, generator=torch.Generator().manual_seed(0)),
        model(x, generator=torch.Generator().manual_seed(0)),
    )


def test_config_json_is_the_documented_pydantic_model(robust, tmp_path):
    robust.save_pretrained(tmp_path / "saved")
    raw = json.loads((tmp_path / "saved" / "config.json").read_text())
    config = RobustModelConfig.model_validate(raw)
    assert config.format_version == FORMAT_VERSION and config.library_name == "nodata-defense"
    assert config.sigma == 0.25 and config.class_names == CLASS_NAMES and config.image_shape == (1, 16, 16)
    assert config.base_classifier.kind == "user" and config.base_classifier.model_class == "TinyCNN"
    assert config.base_denoiser.kind == "text" and config.personalized and config.adaptation_mode == "full"
    assert {"nodata-defense", "torch", "diffusers", "transformers", "peft", "huggingface_hub"} <= set(
        config.versions
    )


def test_model_card_has_hub_metadata_and_the_measured_table(robust, tmp_path):
    from huggingface_hub import ModelCard

    model = RobustModel(
        robust.classifier, robust.denoiser, sigma=0.25, class_names=CLASS_NAMES, info=robust.config
    )
    model.certified_accuracy = {
        "radii": [0.0, 0.25, 0.5],
        "accuracy": [0.9, 0.5, 0.125],
        "sigma": 0.25,
        "n0": 100,
        "n": 10_000,
        "alpha": 0.001,
        "num_images": 8,
        "dataset": "toy",
    }
    model.save_pretrained(tmp_path / "saved")
    card = ModelCard.load(tmp_path / "saved" / "README.md")
    assert card.data.library_name == "nodata-defense"
    assert {"adversarial-robustness", "randomized-smoothing", "diffusion"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local path is not a Hub base model
    assert "| certified accuracy | 90.0 | 50.0 | 12.5 |" in card.text
    assert "classifier=model" in card.text  # this classifier must be passed again
    with pytest.raises(ValueError, match="measured at sigma=0.5"):
        model.certified_accuracy = {**model.certified_accuracy.model_dump(), "sigma": 0.5}


def test_an_interrupted_save_leaves_the_previous_save_untouched(robust, tmp_path, monkeypatch):
    import nodata_defense.adapt as adapt

    target = tmp_path / "saved"
    robust.save_pretrained(target)
    before = {name: (target / name).read_bytes() for name in saved_files(target)}

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(adapt, "save_classifier_adapter", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        robust.save_pretrained(target)
    assert {name: (target / name).read_bytes() for name in saved_files(target)} == before
    assert os.listdir(tmp_path) == ["saved"]  # no staging directory left behind
    with pytest.raises(RuntimeError, match="disk full"):
        robust.save_pretrained(tmp_path / "fresh")
    assert os.listdir(tmp_path) == ["saved"]


def test_save_refuses_to_replace_an_unrelated_directory(robust, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and does not hold a saved RobustModel"):
        robust.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="writes its own config.json"):
        robust.save_pretrained(tmp_path / "x", config={"a": 1})


def test_load_errors_are_clear(robust, tmp_path):
    saved = tmp_path / "saved"
    robust.save_pretrained(saved)
    with pytest.raises(ValueError, match=r"cannot be rebuilt from the saved files: pass it again"):
        RobustModel.from_pretrained(saved)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['map_location'\]"):
        RobustModel.from_pretrained(saved, classifier=TinyCNN(), map_location="cpu")
    with pytest.raises(ValueError, match=r"`sigma` is fixed by the saved model .* certify\(x, sigma=...\)"):
        RobustModel.from_pretrained(saved, classifier=TinyCNN(), sigma=0.5)
    with pytest.raises(ValueError, match="returns 5 logits but 3 class names"):
        RobustModel.from_pretrained(saved, classifier=TinyCNN(num_classes=5))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        RobustModel.from_pretrained(tmp_path / "missing" / "dir")

    broken = tmp_path / "broken"
    robust.save_pretrained(broken)
    (broken / "denoiser_lora" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"incomplete: missing \['denoiser_lora/adapter_model"):
        RobustModel.from_pretrained(broken, classifier=TinyCNN())

    newer = tmp_path / "newer"
    robust.save_pretrained(newer)
    raw = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps({**raw, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match="written by a newer nodata-defense"):
        RobustModel.from_pretrained(newer, classifier=TinyCNN())


def test_bundled_classifier_is_recorded_by_id_and_rebuilt(robust):
    from nodata_defense.classifiers import as_image_classifier
    from nodata_defense.robust_model import _base_classifier, describe_classifier
    from nodata_defense.zoo import load_digit_classifier

    bundled = as_image_classifier(load_digit_classifier())
    source = describe_classifier(bundled, 10)
    assert (source.kind, source.id) == ("bundled", "nodata-defense/digits-cnn")
    changed = load_digit_classifier()
    with torch.no_grad():
        changed.head[-1].bias.add_(1.0)
    assert describe_classifier(as_image_classifier(changed), 10).kind == "user"

    info = robust.config.model_copy(update={"base_classifier": source})
    rebuilt = _base_classifier(info, None, "some/id")
    x = images(2, size=28)
    torch.testing.assert_close(rebuilt.eval()(x), bundled.eval()(x))
