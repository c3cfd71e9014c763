"""Tests of step 3 (classifier adaptation on denoised synthetic images) on tiny seeded models."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import tiny_models
import torch
from tiny_models import cosine_schedule, tiny_unet
from torch import nn

from nodata_defense.adapt import (
    AdaptationResult,
    _denoise,
    adapt_classifier,
    load_classifier_adapter,
    save_classifier_adapter,
)
from nodata_defense.config import AdaptConfig
from nodata_defense.denoiser import DiffusionDenoiser, _PixelBridge

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------- builders
def tiny_denoiser() -> DiffusionDenoiser:
    return DiffusionDenoiser(tiny_unet(), cosine_schedule())


class TinyCNN(tiny_models.TinyCNN):
    """3-class classifier with BatchNorm; `limit` (class-wide) makes the n-th forward call crash."""

    limit: int | None = None
    calls = 0

    def __init__(self) -> None:
        super().__init__(3, 3, width=4, seed=1)
        self.num_classes = 3

    def forward(self, x):
        type(self).calls += 1
        if self.limit is not None and type(self).calls > self.limit:
            raise KeyboardInterrupt
        return super().forward(x)


def colour_references(n: int = 6, size: int = 12) -> SimpleNamespace:
    """Class k is a mostly-k-coloured image: learnable through noise and a poor denoiser."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    colour = torch.nn.functional.one_hot(labels, 3).float().view(n, 3, 1, 1)
    images = (0.2 + 0.5 * colour + 0.1 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)
    return SimpleNamespace(images=images, labels=labels)


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: nn.Module) -> set[str]:
    after = module.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


FAST = {"epochs": 2, "batch_size": 3, "learning_rate": 1e-2}
X = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(7))


# ----------------------------------------------------------------------------------------- training
def test_loss_decreases_over_a_short_run():
    result = adapt_classifier(
        TinyCNN(),
        tiny_denoiser(),
        colour_references(),
        0.25,
        AdaptConfig(epochs=15, batch_size=3, learning_rate=5e-2),
    )
    losses = [h["loss"] for h in result.loss_history]
    assert len(losses) == result.steps == 30
    # Deterministic (fixed seed), so no false failures; here the windows' means are ~1.03 and ~0.29.
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.2


@pytest.mark.parametrize("mode", ["full", "head", "lora", "none"])
def test_each_mode_trains_only_its_part_and_leaves_the_user_model_untouched(mode):
    user = TinyCNN().train()
    user.head.bias.requires_grad_(False)
    before = state(user)
    flags = [p.requires_grad for p in user.parameters()]
    result = adapt_classifier(
        user, tiny_denoiser(), colour_references(), 0.25, AdaptConfig(mode=mode, **FAST)
    )

    assert isinstance(result, AdaptationResult) and result.mode == mode and result.classifier is not user
    assert not changed(before, user) and [p.requires_grad for p in user.parameters()] == flags
    assert all(m.training for m in user.modules()) and not hasattr(user, "peft_config")
    adapted = result.classifier
    assert all(m.training for m in adapted.modules())  # the copy's mode is the user's mode again
    bn_stats = {"body.1.running_mean", "body.1.running_var", "body.1.num_batches_tracked"}
    if mode == "full":
        assert changed(before, adapted) == {
            "body.0.weight",
            "body.0.bias",
            "body.1.weight",
            "body.1.bias",
            "head.weight",
            "head.bias",
        }
        assert result.trainable_parameters == sum(p.numel() for p in user.parameters())
    elif mode == "head":
        assert result.head_module == "head" and changed(before, adapted) == {"head.weight", "head.bias"}
        assert result.trainable_parameters == 15
    elif mode == "lora":
        base = {k.replace(".base_layer", ""): v for k, v in adapted.state_dict().items() if "lora_" not in k}
        assert base.keys() == before.keys() and all(torch.equal(base[k], before[k]) for k in base)
        assert sorted(result.lora_config["target_modules"]) == ["body.0", "head"]
        lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b) and not any(p.requires_grad for p in lora_b)
    else:
        assert result.steps == 0 and not result.loss_history and not changed(before, adapted)
    if mode != "lora":  # (lora: every base tensor was checked above)
        assert not (bn_stats & changed(before, adapted))  # eval() during training: BN statistics kept
    assert [p.requires_grad for n, p in adapted.named_parameters() if "lora_" not in n] == flags


def test_train_mode_lets_batchnorm_statistics_move():
    user = TinyCNN().eval()
    before = state(user)
    result = adapt_classifier(
        user, tiny_denoiser(), colour_references(), 0.25, AdaptConfig(train_mode=True, **FAST)
    )
    assert {"body.1.running_mean", "body.1.running_var"} <= changed(before, result.classifier)
    assert not any(m.training for m in result.classifier.modules())


def test_batch_is_capped_and_steps_follow_epochs():
    result = adapt_classifier(
        TinyCNN(), tiny_denoiser(), colour_references(), 0.25, AdaptConfig(epochs=3, learning_rate=1e-3)
    )
    assert result.steps == 3  # batch 256 capped at the 6 references: one step per epoch
    assert "mode='full'" in repr(result) and "learning_rate=0.001" in repr(result)


def test_per_image_sigmas_denoise_as_the_denoiser_does():
    denoiser = tiny_denoiser()
    bridge = _PixelBridge(denoiser, 3, (12, 12), "x")
    noisy = X + 0.3 * torch.randn(X.shape, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.1, 0.25, 0.5, 0.25], dtype=torch.float64)
    with torch.no_grad():
        got = _denoise(denoiser, bridge, noisy, sigmas, chunk=1)
        for i, s in enumerate(sigmas.tolist()):
            torch.testing.assert_close(got[i : i + 1], denoiser(noisy[i : i + 1], s), rtol=0, atol=1e-6)
    result = adapt_classifier(
        TinyCNN(), denoiser, colour_references(), 0.25, AdaptConfig(sigma_range=(0.1, 0.5), **FAST)
    )
    assert len(result.loss_history) == 4


def test_interrupted_then_resumed_run_ends_identical(tmp_path):
    config = AdaptConfig(epochs=4, batch_size=3, learning_rate=1e-2, checkpoint_every=3)
    reference = adapt_classifier(TinyCNN(), tiny_denoiser(), colour_references(), 0.25, config).classifier

    TinyCNN.calls, TinyCNN.limit = 0, 7  # 7 steps done, crash in the 8th
    try:
        with pytest.raises(KeyboardInterrupt):
            adapt_classifier(
                TinyCNN(), tiny_denoiser(), colour_references(), 0.25, config, checkpoint_dir=tmp_path
            )
    finally:
        TinyCNN.limit = None
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 6
    result = adapt_classifier(
        TinyCNN(), tiny_denoiser(), colour_references(), 0.25, config, checkpoint_dir=tmp_path
    )
    assert result.resumed_from_step == 6 and len(result.loss_history) == 8
    assert not changed(state(reference), result.classifier)


# ------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("mode", ["full", "head", "lora", "none"])
def test_save_then_load_reproduces_the_adapted_logits(tmp_path, mode):
    user = TinyCNN().eval()
    result = adapt_classifier(
        user, tiny_denoiser(), colour_references(), 0.25, AdaptConfig(mode=mode, **FAST)
    )
    save_classifier_adapter(result, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    expected_files = {
        "full": ["classifier_adapter.json", "classifier_adapter.safetensors"],
        "head": ["classifier_adapter.json", "classifier_adapter.safetensors"],
        "lora": ["adapter_config.json", "adapter_model.safetensors", "classifier_adapter.json"],
        "none": ["classifier_adapter.json"],
    }[mode]
    assert files == expected_files
    assert json.loads((tmp_path / "classifier_adapter.json").read_text())["mode"] == mode

    loaded = load_classifier_adapter(user, tmp_path)
    assert loaded is not user
    with torch.no_grad():
        assert torch.equal(loaded(X), result.classifier(X))
        if mode != "none":
            assert not torch.equal(loaded(X), user(X))


def test_saving_a_plain_module_needs_the_mode(tmp_path):
    result = adapt_classifier(
        TinyCNN(), tiny_denoiser(), colour_references(), 0.25, AdaptConfig(mode="head", **FAST)
    )
    with pytest.raises(ValueError, match=r"mode='head' needs `head_module`"):
        save_classifier_adapter(result.classifier, tmp_path, "head")
    with pytest.raises(
        ValueError, match=r"`mode` must be one of \('full', 'lora', 'head', 'none'\); got None"
    ):
        save_classifier_adapter(result.classifier, tmp_path)
    with pytest.raises(ValueError, match=r"`mode`='full' contradicts the result's mode 'head'"):
        save_classifier_adapter(result, tmp_path, "full")
    save_classifier_adapter(result.classifier, tmp_path, "head", head_module="head")
    with torch.no_grad():
        assert torch.equal(load_classifier_adapter(TinyCNN(), tmp_path)(X), result.classifier(X))

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(5, 3)

    with pytest.raises(ValueError, match=r"do not fit this classifier"):
        load_classifier_adapter(Other(), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no classifier_adapter.json"):
        load_classifier_adapter(TinyCNN(), tmp_path / "missing")


# ---------------------------------------------------------------------------------------- bad input
def test_bad_inputs_are_refused_with_clear_errors():
    den, clf, refs = tiny_denoiser(), TinyCNN(), colour_references()
    with pytest.raises(ValueError, match=r"`sigma` must be a finite number > 0; got 0"):
        adapt_classifier(clf, den, refs, 0, AdaptConfig(**FAST))
    with pytest.raises(ValueError, match=r"`sigma`=1e\+06 is beyond this diffusion schedule"):
        adapt_classifier(clf, den, refs, 1e6, AdaptConfig(**FAST))
    with pytest.raises(ValueError, match=r"`sigma_range` must be \(low, high\) with 0 < low <= high"):
        AdaptConfig(sigma_range=(0.0, 0.5))
    with pytest.raises(ValueError, match=r"epochs\n  Input should be greater than or equal to 1"):
        adapt_classifier(clf, den, refs, 0.25, {"epochs": 0})
    with pytest.raises(ValueError, match=r"mode\n  Input should be 'full', 'lora', 'head' or 'none'"):
        AdaptConfig(mode="last")
    with pytest.raises(ValueError, match=r"`references` is empty"):
        adapt_classifier(
            clf, den, SimpleNamespace(images=torch.rand(0, 3, 8, 8), labels=torch.zeros(0)), 0.25
        )
    with pytest.raises(ValueError, match=r"`references.labels` must lie in \[0, 2\] .* got a maximum of 5"):
        adapt_classifier(clf, den, SimpleNamespace(images=refs.images, labels=torch.arange(6)), 0.25)
    with pytest.raises(ValueError, match=r"`references.images` must hold pixel values in \[0, 1\]"):
        adapt_classifier(clf, den, SimpleNamespace(images=refs.images * 255, labels=refs.labels), 0.25)
    with pytest.raises(TypeError, match=r"`classifier` must be a torch.nn.Module"):
        adapt_classifier(lambda x: x, den, refs, 0.25)
    with pytest.raises(ValueError, match=r"`head_module`='neck' is not a submodule of the TinyCNN"):
        adapt_classifier(clf, den, refs, 0.25, AdaptConfig(mode="head", head_module="neck", **FAST))

    class Unused(TinyCNN):
        def __init__(self):
            super().__init__()
            self.projection = nn.Linear(3, 3)  # never used in forward

    with pytest.raises(
        ValueError, match=r"the head layer 'projection' does not influence the classifier's logits"
    ):
        adapt_classifier(
            Unused(), den, refs, 0.25, AdaptConfig(mode="head", head_module="projection", **FAST)
        )
    with pytest.raises(ValueError, match=r"`target_modules`=\['nothing'\] match no layer of the classifier"):
        adapt_classifier(
            clf, den, refs, 0.25, AdaptConfig(mode="lora", lora_target_modules=["nothing"], **FAST)
        )


def test_accepts_a_reference_set():
    synthesis = pytest.importorskip("nodata_defense.synthesis")
    refs = colour_references()
    reference_set = synthesis.ReferenceSet(
        images=refs.images, labels=refs.labels, class_names=["r", "g", "b"], prompts=["p"] * 6
    )
    from_set = adapt_classifier(TinyCNN(), tiny_denoiser(), reference_set, 0.25, AdaptConfig(**FAST))
    from_namespace = adapt_classifier(TinyCNN(), tiny_denoiser(), refs, 0.25, AdaptConfig(**FAST))
    assert from_set.loss_history == from_namespace.loss_history
