"""Tests of step 2 (classifier-guided LoRA personalization of the denoiser) on tiny seeded models."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import tiny_models
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_models import cosine_schedule, tiny_if_unet, tiny_text_unet, tiny_unet
from torch import nn

from nodata_defense._training import step_seed
from nodata_defense.config import PersonalizeConfig
from nodata_defense.denoiser import DiffusionDenoiser
from nodata_defense.personalize import (
    ADAPTER_NAME,
    PersonalizationResult,
    _training_draws,
    load_denoiser_adapter,
    personalize,
    save_denoiser_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------- builders
WIDTH = 16  # the text UNet's cross-attention width
EMBED = torch.randn(1, 5, WIDTH, generator=torch.Generator().manual_seed(3))


def text_denoiser(channels: int = 3) -> DiffusionDenoiser:
    # A precomputed "" prompt embedding stands in for the text encoder (as a released encoder would).
    return DiffusionDenoiser(tiny_text_unet(channels), cosine_schedule(), prompt_embeds={"": EMBED})


def if_denoiser() -> DiffusionDenoiser:
    embed = torch.randn(1, 6, 12, generator=torch.Generator().manual_seed(4))
    return DiffusionDenoiser(tiny_if_unet(), cosine_schedule(), prompt_embeds={"": embed})


class TinyCNN(tiny_models.TinyCNN):
    """A 3-class classifier with a BatchNorm layer; counts its forward calls."""

    def __init__(self, channels: int = 3, num_classes: int = 3) -> None:
        super().__init__(channels, num_classes, width=4, seed=1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


class Exploding(nn.Module):
    """Stands for a classifier that must never be called."""

    num_classes = 3

    def forward(self, x):
        raise AssertionError("the classifier was called")


def references(n: int = 6, channels: int = 3, size: int = 12, seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        images=torch.rand(n, channels, size, size, generator=g), labels=torch.arange(n) % 3
    )


def base_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's base weights under their original names (peft wraps layers as `.base_layer`)."""
    return {
        k.replace(".base_layer", ""): v.detach().clone()
        for k, v in unet.state_dict().items()
        if "lora_" not in k
    }


def lora_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items() if "lora_" in k}


FAST = {"steps": 4, "batch_size": 6, "learning_rate": 1e-2}


# ----------------------------------------------------------------------------------------- training
def test_loss_decreases_over_a_short_run():
    denoiser = text_denoiser()
    result = personalize(
        denoiser,
        TinyCNN(),
        references(),
        PersonalizeConfig(steps=40, batch_size=6, learning_rate=1e-2, timestep_range=(100, 600), seed=0),
    )
    losses = [h["loss"] for h in result.loss_history]
    assert len(losses) == 40 and all("mse" in h and "ce" in h for h in result.loss_history)
    # Deterministic (fixed seed), so no false failures: here the windows' means are ~1.10 and ~1.00,
    # a drop ~10x the standard error of either mean (per-step losses spread by ~0.03).
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.05
    assert isinstance(result, PersonalizationResult) and result.steps == 40
    assert "lora_rank=4" in repr(result) and "classifier_weight=0.01" in repr(result)


def test_only_lora_weights_change_and_modes_are_restored():
    denoiser, classifier = text_denoiser(), TinyCNN()
    classifier.train()
    classifier.head.weight.requires_grad_(False)  # a user's own freezing must survive
    unet_before = base_state(denoiser.unet)
    clf_before = {k: v.clone() for k, v in classifier.state_dict().items()}
    flags_before = {n: p.requires_grad for n, p in denoiser.unet.named_parameters()}
    modes_before = {n: m.training for n, m in denoiser.named_modules()}

    result = personalize(denoiser, classifier, references(), PersonalizeConfig(**FAST))

    after = base_state(denoiser.unet)
    assert after.keys() == unet_before.keys()
    assert all(torch.equal(after[k], unet_before[k]) for k in after)
    assert all(torch.equal(v, clf_before[k]) for k, v in classifier.state_dict().items())
    assert classifier.training and all(m.training for m in classifier.modules())
    assert [p.requires_grad for p in classifier.parameters()] == [True, True, True, True, False, True]
    modes_after = {n: m.training for n, m in denoiser.named_modules()}
    assert all(modes_after[n] == training for n, training in modes_before.items())
    assert not denoiser.unet.training
    assert {
        n.replace(".base_layer", ""): p.requires_grad
        for n, p in denoiser.unet.named_parameters()
        if "lora_" not in n
    } == flags_before
    lora = lora_state(denoiser.unet)
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at 0
    assert result.lora_parameters == sum(v.numel() for v in lora.values())
    assert result.adapter_name == ADAPTER_NAME and result.lora_config["r"] == 4


def test_zero_weight_is_exactly_the_plain_denoising_loss():
    denoiser = text_denoiser()
    refs = references(size=16)  # the UNet's size: no resizing in the independent computation
    config = PersonalizeConfig(steps=1, batch_size=4, classifier_weight=0.0, seed=7)
    result = personalize(denoiser, Exploding(), refs, config)
    assert set(result.loss_history[0]) == {"loss", "mse"}
    assert personalize(text_denoiser(), None, refs, config).loss_history == result.loss_history

    # Independent computation with the same draws (step 0 of seed 7) and the bare base UNet.
    generator = torch.Generator().manual_seed(step_seed(7, 0, 0))
    index, t, eps = _training_draws(generator, 6, 4, (0, 999), (3, 16, 16))
    alpha = cosine_schedule().alphas_cumprod.to(torch.float64)[t].float().view(-1, 1, 1, 1)
    x_t = alpha.sqrt() * (2 * refs.images[index] - 1) + (1 - alpha).sqrt() * eps
    unet = tiny_text_unet(3)
    with torch.no_grad():
        eps_hat = unet(x_t, t, encoder_hidden_states=EMBED.repeat(4, 1, 1)).sample
    expected = F.mse_loss(eps_hat, eps).item()
    assert result.loss_history[0]["loss"] == pytest.approx(expected, rel=1e-6, abs=0)


def test_classifier_term_is_added_with_its_weight():
    result = personalize(
        text_denoiser(), TinyCNN(), references(), PersonalizeConfig(steps=1, classifier_weight=0.5)
    )
    h = result.loss_history[0]
    assert h["loss"] == pytest.approx(h["mse"] + 0.5 * h["ce"], rel=1e-6)


def test_interrupted_then_resumed_run_ends_identical(tmp_path):
    config = PersonalizeConfig(steps=8, batch_size=4, learning_rate=1e-2, checkpoint_every=3, seed=2)
    reference = text_denoiser()
    personalize(reference, TinyCNN(), references(), config)

    class Crashing(TinyCNN):
        def forward(self, x):
            if (
                self.calls >= 7
            ):  # the probe of num_classes is skipped (num_classes set): 7 steps, crash in 8th
                raise KeyboardInterrupt
            return super().forward(x)

    crashing = Crashing()
    crashing.num_classes = 3
    interrupted = text_denoiser()
    keys_before = list(interrupted.unet.state_dict())
    with pytest.raises(KeyboardInterrupt):
        personalize(interrupted, crashing, references(), config, checkpoint_dir=tmp_path)
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 6
    assert list(interrupted.unet.state_dict()) == keys_before  # the half-trained adapter was removed
    assert not hasattr(interrupted.unet, "peft_config") or not interrupted.unet.peft_config

    result = personalize(interrupted, TinyCNN(), references(), config, checkpoint_dir=tmp_path)
    assert result.resumed_from_step == 6 and len(result.loss_history) == 8
    expected, got = lora_state(reference.unet), lora_state(interrupted.unet)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    personalize(text_denoiser(), TinyCNN(), references(), PersonalizeConfig(steps=1), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"holds a checkpoint of a different run"):
        personalize(
            text_denoiser(),
            TinyCNN(),
            references(),
            PersonalizeConfig(steps=1, seed=5),
            checkpoint_dir=tmp_path,
        )


def test_if_superres_denoiser_and_grayscale_references_are_supported():
    denoiser = if_denoiser()
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(9))
    before = denoiser(x, 0.25)
    result = personalize(denoiser, TinyCNN(), references(), PersonalizeConfig(**FAST))
    assert len(result.loss_history) == 4 and not torch.equal(denoiser(x, 0.25), before)

    # 1-channel references with an RGB UNet at another size: the classifier sees 1-channel 12x12 images.
    seen = []
    gray = TinyCNN(channels=1)
    gray.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    personalize(text_denoiser(), gray, references(channels=1), PersonalizeConfig(steps=1, batch_size=6))
    assert seen[-1] == (6, 1, 12, 12)


def test_unet_without_attention_needs_explicit_targets():
    denoiser = DiffusionDenoiser(tiny_unet(attention=False), cosine_schedule())
    with pytest.raises(
        ValueError, match=r"`target_modules`=\['to_q', .* match no layer of the denoiser's UNet"
    ):
        personalize(denoiser, TinyCNN(), references(), PersonalizeConfig(**FAST))
    assert not hasattr(denoiser.unet, "peft_config")
    result = personalize(
        denoiser, TinyCNN(), references(), PersonalizeConfig(**FAST, target_modules=["conv1", "conv2"])
    )
    assert result.lora_parameters > 0 and result.adapted_modules


# ------------------------------------------------------------------------------------- save / load
def test_adapter_save_then_load_gives_identical_outputs(tmp_path):
    denoiser = text_denoiser()
    personalize(denoiser, TinyCNN(), references(), PersonalizeConfig(**FAST))
    save_denoiser_adapter(denoiser, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    assert sorted(config["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    assert all(
        ".lora_A.weight" in k or ".lora_B.weight" in k
        for k in load_file(tmp_path / "adapter_model.safetensors")
    )

    fresh = text_denoiser()
    assert load_denoiser_adapter(fresh, tmp_path) == ADAPTER_NAME
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(fresh(x, 0.5), denoiser(x, 0.5))
        assert not torch.equal(text_denoiser()(x, 0.5), denoiser(x, 0.5))
    assert not any(p.requires_grad for n, p in fresh.unet.named_parameters() if "lora_" in n)

    # The same files load with diffusers' own LoRA loader.
    unet = tiny_text_unet(3)
    unet.load_lora_adapter(str(tmp_path), weight_name="adapter_model.safetensors", prefix=None)
    with torch.no_grad():
        same = DiffusionDenoiser(unet, cosine_schedule(), prompt_embeds={"": EMBED})(x, 0.5)
        assert torch.equal(same, denoiser(x, 0.5))


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no adapter file .*adapter_config.json"):
        load_denoiser_adapter(text_denoiser(), tmp_path)
    denoiser = text_denoiser()
    personalize(denoiser, TinyCNN(), references(), PersonalizeConfig(steps=1))
    save_denoiser_adapter(denoiser, tmp_path)
    with pytest.raises(ValueError, match=r"already holds an adapter named 'personalized'"):
        load_denoiser_adapter(denoiser, tmp_path)
    with pytest.raises(ValueError, match=r"already holds an adapter named 'personalized'"):
        personalize(denoiser, TinyCNN(), references(), PersonalizeConfig(steps=1))
    with pytest.raises(ValueError, match=r"match no layer of the model the adapter is loaded into"):
        load_denoiser_adapter(DiffusionDenoiser(tiny_unet(attention=False), cosine_schedule()), tmp_path)
    other = DiffusionDenoiser(tiny_unet(), cosine_schedule())
    with pytest.raises(ValueError, match=r"does not fit this model: missing \['down_blocks.1.attentions"):
        load_denoiser_adapter(other, tmp_path)
    assert not hasattr(other.unet, "peft_config")  # a failed load leaves the model as it was
    with pytest.raises(ValueError, match=r"holds no adapter named 'personalized'"):
        save_denoiser_adapter(text_denoiser(), tmp_path / "other")


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("classifier_weight", -0.1, r"classifier_weight\n  Input should be greater than or equal to 0"),
        ("steps", 0, r"steps\n  Input should be greater than or equal to 1"),
        ("lora_rank", 0, r"lora_rank\n  Input should be greater than or equal to 1"),
        ("timestep_range", (500, 100), r"`timestep_range` must be \(low, high\) with 0 <= low <= high"),
    ],
)
def test_bad_config_values_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        PersonalizeConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        personalize(text_denoiser(), TinyCNN(), references(), {field: value})


def test_bad_inputs_are_refused_with_clear_errors():
    den, clf = text_denoiser(), TinyCNN()
    empty = SimpleNamespace(images=torch.rand(0, 3, 12, 12), labels=torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`references` is empty"):
        personalize(den, clf, empty, PersonalizeConfig(**FAST))
    out_of_range = SimpleNamespace(images=torch.rand(2, 3, 12, 12), labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"`references.labels` must lie in \[0, 2\] .* got a maximum of 3"):
        personalize(den, clf, out_of_range, PersonalizeConfig(**FAST))
    normalized = SimpleNamespace(images=torch.rand(2, 3, 12, 12) * 2 - 1, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"`references.images` must hold pixel values in \[0, 1\]"):
        personalize(den, clf, normalized, PersonalizeConfig(**FAST))
    with pytest.raises(TypeError, match=r"`references` must be a ReferenceSet"):
        personalize(den, clf, torch.rand(2, 3, 12, 12), PersonalizeConfig(**FAST))
    with pytest.raises(ValueError, match=r"`references.labels` must have shape \(2,\)"):
        personalize(den, clf, SimpleNamespace(images=torch.rand(2, 3, 12, 12), labels=torch.tensor([0])))
    with pytest.raises(TypeError, match=r"`classifier` must be callable .* classifier_weight=0.01 > 0"):
        personalize(den, None, references(), PersonalizeConfig(**FAST))
    with pytest.raises(ValueError, match=r"`timestep_range`=\(0, 1000\) must lie in \[0, 999\]"):
        personalize(den, clf, references(), PersonalizeConfig(**FAST, timestep_range=(0, 1000)))
    with pytest.raises(ValueError, match=r"has 3-channel images but the denoiser's UNet works on 1-channel"):
        personalize(text_denoiser(channels=1), clf, references(), PersonalizeConfig(**FAST))
    conditional = DiffusionDenoiser(tiny_unet(num_class_embeds=3), cosine_schedule())
    with pytest.raises(ValueError, match=r"`denoiser` is class-conditional"):
        personalize(conditional, clf, references(), PersonalizeConfig(**FAST))
    with pytest.raises(TypeError, match=r"`denoiser` must be a DiffusionDenoiser"):
        personalize(tiny_text_unet(3), clf, references(), PersonalizeConfig(**FAST))
    assert not hasattr(den.unet, "peft_config")  # nothing was injected by the refused calls


def test_accepts_a_reference_set():
    synthesis = pytest.importorskip("nodata_defense.synthesis")
    refs = references()
    reference_set = synthesis.ReferenceSet(
        images=refs.images, labels=refs.labels, class_names=["a", "b", "c"], prompts=["p"] * 6
    )
    from_set = personalize(text_denoiser(), TinyCNN(), reference_set, PersonalizeConfig(steps=2))
    from_namespace = personalize(text_denoiser(), TinyCNN(), refs, PersonalizeConfig(steps=2))
    assert from_set.loss_history == from_namespace.loss_history


def test_low_precision_unet_trains_float32_lora_weights():
    denoiser = DiffusionDenoiser(
        tiny_text_unet(3).to(torch.bfloat16), cosine_schedule(), prompt_embeds={"": EMBED}
    )
    result = personalize(denoiser, TinyCNN(), references(), PersonalizeConfig(steps=2, learning_rate=1e-2))
    dtypes = {n: p.dtype for n, p in denoiser.unet.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.loss_history)
