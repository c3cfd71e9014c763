"""Robustifier: input validation, defaults, and end-to-end fit() on tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from robust_fixtures import CLASS_NAMES, images, save_tiny_t2i, tiny_tokenizer, without_time
from tiny_models import CLIP_TEXT_BODY, VIT_BODY, TinyCNN
from torch import nn

from nodata_defense import (
    ABSTAIN,
    DiffusionDenoiser,
    Robustifier,
    RobustifierConfig,
    RobustModel,
    ZeroShotClassifier,
    as_image_classifier,
)
from nodata_defense.robustifier import _step_configs
from nodata_defense.synthesis import CallableGenerator, PixelDiffusionGenerator

# Small enough for a full fit() in a few seconds on one CPU core.
FAST = {
    "synthesis": {"num_inference_steps": 2, "shots_per_class": 2},
    "personalize": {"steps": 3, "batch_size": 4},
    "adapt": {"epochs": 2, "batch_size": 4, "learning_rate": 1e-3},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def t2i_dir(tmp_path_factory) -> Path:
    return save_tiny_t2i(tmp_path_factory.mktemp("t2i"))


@pytest.fixture(scope="module")
def rgb_t2i_dir(tmp_path_factory) -> Path:
    return save_tiny_t2i(tmp_path_factory.mktemp("t2i_rgb"), channels=3)


def tiny_vit(directory: Path, num_labels: int = 3):
    """A tiny ViT classifier saved and reloaded, so it carries its path as `name_or_path`."""
    from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(**VIT_BODY, num_labels=num_labels)
    ViTForImageClassification(config).save_pretrained(directory)
    return AutoModelForImageClassification.from_pretrained(directory).eval()


def tiny_clip(directory: Path):
    """A tiny CLIP model + a locally built tokenizer, saved and reloaded from ``directory``."""
    from transformers import AutoModel, AutoTokenizer, CLIPConfig, CLIPModel

    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": vocab,
            **CLIP_TEXT_BODY,
            "max_position_embeddings": 8,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "pad_token_id": 0,
        },
        vision_config=dict(VIT_BODY),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return AutoModel.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


# ------------------------------------------------------------------------------------ end to end
def test_fit_end_to_end_then_predict_certify_and_resume(t2i_dir, tmp_path):
    model = TinyCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generator = PixelDiffusionGenerator.from_pretrained(t2i_dir)
    config = RobustifierConfig(**FAST, image_shape=(1, 16, 16), seed=7)
    robustifier = Robustifier(
        model, CLASS_NAMES, sigma=0.25, generator=generator, denoiser=str(t2i_dir), config=config
    )
    robust = robustifier.fit(work_dir=tmp_path / "work")

    assert isinstance(robust, RobustModel)
    assert robust.sigma == 0.25 and robust.class_names == CLASS_NAMES and robust.image_shape == (1, 16, 16)
    info = robust.config
    assert info.personalized and info.adaptation_mode == "full"
    assert info.base_denoiser.id == str(t2i_dir) and info.base_denoiser.kind == "text"
    assert info.fit_config.seed == 7 and info.fit_config.personalize.steps == 3
    for key, value in model.state_dict().items():  # the user's classifier is left as it was
        torch.testing.assert_close(value, before[key])

    x = images(2, seed=3)
    predictions = robust.predict(x, n=30, batch_size=32, generator=0)
    certificates = robust.certify(x, n0=10, n=30, batch_size=32, generator=0)
    assert all(p.label == ABSTAIN or 0 <= p.label < 3 for p in predictions)
    assert all(c.label == ABSTAIN or c.radius > 0 for c in certificates)

    # A second fit over the same work_dir reuses the cached references and the final checkpoints.
    again = robustifier.fit(work_dir=tmp_path / "work")
    assert without_time(again.certify(x, n0=10, n=30, batch_size=32, generator=0)) == without_time(
        certificates
    )


def test_fit_with_a_callable_generator_and_a_denoiser_object(t2i_dir):
    def draw(prompts, generator):
        return torch.rand(len(prompts), 1, 16, 16, generator=generator)

    denoiser = DiffusionDenoiser.from_pretrained(t2i_dir)
    config = RobustifierConfig(**{**FAST, "adapt": {**FAST["adapt"], "mode": "head"}})
    robustifier = Robustifier(
        TinyCNN(),
        CLASS_NAMES,
        generator=CallableGenerator(draw, id="noise"),
        denoiser=denoiser,
        config=config,
    )
    assert robustifier.image_shape == (1, 16, 16)  # read from the denoiser object
    robust = robustifier.fit()
    assert robust.denoiser is denoiser and robust.config.adaptation_mode == "head"
    assert robust.config.adaptation_head_module == "model.head"
    assert robust(images(2), generator=torch.Generator().manual_seed(0)).shape == (2, 3)
    with pytest.raises(ValueError, match="personalized in place by an earlier fit"):
        robustifier.fit()


def test_vit_classifier_fits_and_reloads_from_its_id(rgb_t2i_dir, tmp_path):
    vit = tiny_vit(tmp_path / "vit")
    robustifier = Robustifier(
        vit, CLASS_NAMES, generator=str(rgb_t2i_dir), denoiser=str(rgb_t2i_dir), config=FAST
    )
    assert robustifier.image_shape == (3, 16, 16)  # from the ViT config
    robust = robustifier.fit()
    source = robust.config.base_classifier
    assert (source.kind, source.id, source.model_class) == (
        "transformers",
        str(tmp_path / "vit"),
        "ViTForImageClassification",
    )
    robust.save_pretrained(tmp_path / "saved")
    loaded = RobustModel.from_pretrained(tmp_path / "saved")  # no classifier=: rebuilt from its id
    x = images(2, channels=3)
    torch.testing.assert_close(
        loaded(x, generator=torch.Generator().manual_seed(1)),
        robust(x, generator=torch.Generator().manual_seed(1)),
    )


def test_clip_zero_shot_classifier_path(rgb_t2i_dir, tmp_path):
    clip, tokenizer = tiny_clip(tmp_path / "clip")
    zero_shot = ZeroShotClassifier.from_clip(clip, tokenizer, CLASS_NAMES, templates=["a photo of {}"])
    robustifier = Robustifier(zero_shot, CLASS_NAMES, denoiser=str(rgb_t2i_dir), config=FAST)
    assert robustifier.image_shape == (3, 16, 16)  # from the CLIP vision config
    with pytest.raises(ValueError, match="returns 3 logits but 2 class names"):
        Robustifier(zero_shot, CLASS_NAMES[:2], denoiser=str(rgb_t2i_dir))

    denoiser = DiffusionDenoiser.from_pretrained(rgb_t2i_dir)
    robust = RobustModel(zero_shot, denoiser, sigma=0.25, class_names=CLASS_NAMES)
    x = images(2, channels=3)
    logits = robust(x, generator=torch.Generator().manual_seed(0))
    assert logits.shape == (2, 3) and bool(torch.isfinite(logits).all())
    source = robust.config.base_classifier
    assert (source.kind, source.templates) == ("clip_zero_shot", ["a photo of {}"])

    robust.save_pretrained(tmp_path / "saved")
    loaded = RobustModel.from_pretrained(
        tmp_path / "saved", denoiser=DiffusionDenoiser.from_pretrained(rgb_t2i_dir)
    )
    torch.testing.assert_close(loaded(x, generator=torch.Generator().manual_seed(0)), logits)


# ------------------------------------------------------------------------------------- validation
def test_bad_inputs_are_refused_with_clear_errors(t2i_dir):
    ok = {"config": {"image_shape": (1, 16, 16)}}
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        Robustifier(lambda x: x, CLASS_NAMES, **ok)
    with pytest.raises(ValueError, match="at least one class name"):
        Robustifier(TinyCNN(), [], **ok)
    with pytest.raises(ValueError, match=r"distinct names; 'one' appears at positions 1 and 2"):
        Robustifier(TinyCNN(), ["zero", "one", "one"], **ok)
    with pytest.raises(ValueError, match="at least 2 classes"):
        Robustifier(TinyCNN(num_classes=1), ["only"], **ok)
    with pytest.raises(ValueError, match=r"returns 3 logits but 4 class names were given"):
        Robustifier(TinyCNN(), [*CLASS_NAMES, "three"], **ok)
    for sigma in (0.0, -0.25, float("nan")):
        with pytest.raises(ValueError, match="`sigma` must be a finite number > 0"):
            Robustifier(TinyCNN(), CLASS_NAMES, sigma=sigma, **ok)
    with pytest.raises(ValueError, match="greater than 0"):
        RobustifierConfig(sigma=0)
    with pytest.raises(ValueError, match=r"`sigma`=0.5 contradicts `config.sigma`=0.25"):
        Robustifier(TinyCNN(), CLASS_NAMES, sigma=0.5, config={"sigma": 0.25, "image_shape": (1, 16, 16)})
    with pytest.raises(ValueError, match=r"failed on a dummy input of shape \(1, 3, 16, 16\)"):
        Robustifier(TinyCNN(), CLASS_NAMES, config={"image_shape": (3, 16, 16)})
    with pytest.raises(TypeError, match="`generator` must be a text-to-image back-end.*CallableGenerator"):
        Robustifier(TinyCNN(), CLASS_NAMES, generator=lambda prompts, g: None, **ok)
    with pytest.raises(TypeError, match="`denoiser` must be a DiffusionDenoiser, a Hub id or a local path"):
        Robustifier(TinyCNN(), CLASS_NAMES, denoiser=nn.Identity(), **ok)
    with pytest.raises(ValueError, match="beyond this diffusion schedule"):
        Robustifier(TinyCNN(), CLASS_NAMES, sigma=1e6, denoiser=DiffusionDenoiser.from_pretrained(t2i_dir))
    with pytest.raises(TypeError, match="`config` must be a RobustifierConfig"):
        Robustifier(TinyCNN(), CLASS_NAMES, config=3)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        Robustifier(TinyCNN(), CLASS_NAMES, config={"sigmaa": 0.5})


def test_repr_shows_the_settings():
    text = repr(Robustifier(TinyCNN(), CLASS_NAMES, sigma=0.5, config={"image_shape": (1, 16, 16)}))
    for part in (
        "sigma=0.5",
        "classes=3",
        "image_shape=(1, 16, 16)",
        "TinyCNN",
        "personalize_steps=500",
        "adapt_mode='full'",
    ):
        assert part in text


def test_image_shape_defaults():
    from nodata_defense.zoo import DigitCNN

    assert Robustifier(DigitCNN(num_classes=3), CLASS_NAMES).image_shape == (1, 28, 28)
    grey = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    assert Robustifier(grey, CLASS_NAMES).image_shape == (1, 256, 256)  # the paper's resolution


def test_top_level_seed_and_progress_reach_every_step():
    steps = _step_configs(RobustifierConfig(seed=11), show=True)
    assert {name: (c.seed, c.show_progress) for name, c in steps.items()} == {
        "synthesis": (11, True),
        "personalize": (11, True),
        "adapt": (11, True),
    }
    assert _step_configs(RobustifierConfig(personalize={"seed": 3}), show=False)["personalize"].seed == 3


def test_defaults_pick_the_bundled_digits_model_or_the_paper_models(monkeypatch):
    import nodata_defense.robustifier as module
    from nodata_defense.zoo import DigitCNN

    asked = []

    def record(source, **kwargs):
        asked.append(source)
        raise RuntimeError("stop after choosing the generator")

    monkeypatch.setattr(module, "load_generator", record)
    for model in (DigitCNN(num_classes=3), as_image_classifier(TinyCNN(channels=3))):
        with pytest.raises(RuntimeError, match="stop after choosing"):
            Robustifier(model, CLASS_NAMES).fit()
    assert asked == ["nodata-defense/digits-t2i", "DeepFloyd/IF-I-XL-v1.0"]
    assert Robustifier(DigitCNN(num_classes=3), CLASS_NAMES).default_models() == (
        "nodata-defense/digits-t2i",
        "nodata-defense/digits-denoiser",
    )
    grey = as_image_classifier(TinyCNN(channels=1))
    assert Robustifier(grey, CLASS_NAMES, config={"image_shape": (1, 32, 32)}).default_models() == (
        "DeepFloyd/IF-I-XL-v1.0",
        "DeepFloyd/IF-II-L-v1.0",
    )


@pytest.mark.slow
def test_bundled_digits_models_are_the_defaults_end_to_end():
    """The offline demo path: bundled classifier, generator and denoiser, no argument but the names."""
    from nodata_defense.zoo import DIGIT_CLASS_NAMES, load_digit_classifier, load_digits
    from nodata_defense.zoo.models import DIGIT_T2I_DIR, WEIGHTS_DIR

    if not (DIGIT_T2I_DIR.is_dir() and (WEIGHTS_DIR / "digits-denoiser").is_dir()):
        pytest.skip("the bundled digits text-to-image model or denoiser is not in this checkout")
    config = {
        "synthesis": {"num_inference_steps": 10},
        "personalize": {"steps": 5, "batch_size": 10},
        "adapt": {"mode": "head", "epochs": 1, "learning_rate": 1e-4},
    }
    robust = Robustifier(load_digit_classifier(), DIGIT_CLASS_NAMES, config=config).fit()
    assert robust.config.base_denoiser.id == "nodata-defense/digits-denoiser"
    assert robust.config.base_classifier.kind == "bundled"
    test = load_digits("test")
    certificates = robust.certify(test.images[:4], n0=10, n=50, generator=0)
    assert len(certificates) == 4
