"""Tests of the one-shot diffusion denoiser with tiny random-weight UNets built from config."""

from __future__ import annotations

import json
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from tiny_models import (
    clip_text_encoder,
    cosine_schedule,
    save_t2i,
    t5_encoder,
    tiny_if_unet,
    tiny_text_unet,
    tiny_unet,
    word_tokenizer,
)
from torch import nn

from nodata_defense.denoiser import DenoisedClassifier, DiffusionDenoiser

pytestmark = pytest.mark.usefixtures("one_thread")


WORDS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "a", "photo", "of", "zero", "one", "two", "this", "is", "digit"]


# ----------------------------------------------------------------------------------------- builders
tiny_tokenizer = partial(word_tokenizer, WORDS)
tiny_clip = partial(clip_text_encoder, len(WORDS))
tiny_t5 = partial(t5_encoder, len(WORDS))


def linear() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


class OracleUNet(nn.Module):
    """Knows the clean image and returns the exact ε (or v, or x0) for whatever x_t it receives."""

    def __init__(self, clean: torch.Tensor, alphas: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        self.clean = clean.double()  # model space [-1, 1]
        self.alphas = alphas.double()
        self.prediction_type = prediction_type
        c, size = clean.shape[1], clean.shape[-1]
        self.config = SimpleNamespace(in_channels=c, out_channels=c, sample_size=size)
        self.seen_timesteps: list[torch.Tensor] = []

    def forward(self, sample, timestep, return_dict=True):
        self.seen_timesteps.append(timestep)
        a = self.alphas[timestep].view(-1, 1, 1, 1)
        s0, s1 = a.sqrt(), (1 - a).sqrt()
        x_t = sample.double()
        eps = (x_t - s0 * self.clean) / s1
        out = {"epsilon": eps, "v_prediction": s0 * eps - s1 * self.clean, "sample": self.clean}
        return (out[self.prediction_type].to(sample.dtype),)


# ------------------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [(cosine_schedule, {0.25: 289, 0.5: 496, 1.0: 702}), (linear, {0.25: 145, 0.5: 259, 1.0: 396})],
    ids=["IF-cosine", "DDPM-linear"],
)
def test_timestep_for_sigma_matches_reference_table(scheduler, expected):
    denoiser = DiffusionDenoiser(tiny_unet(), scheduler())
    assert {s: denoiser.timestep_for_sigma(s) for s in expected} == expected


@pytest.mark.parametrize("scheduler", [cosine_schedule, linear], ids=["cosine", "linear"])
def test_timestep_for_sigma_is_the_first_step_reaching_two_sigma(scheduler):
    sched = scheduler()
    denoiser = DiffusionDenoiser(tiny_unet(), sched)
    a = sched.alphas_cumprod.double().numpy()
    ratio = np.sqrt(1 - a) / np.sqrt(a)
    for sigma in [0.01, 0.1, 0.12, 0.25, 0.33, 0.5, 0.75, 1.0, 2.0, 10.0]:
        t = denoiser.timestep_for_sigma(sigma)
        assert ratio[t] >= 2 * sigma
        assert t == 0 or ratio[t - 1] < 2 * sigma
        assert denoiser.sigma_for_timestep(t) >= sigma


def test_sigma_beyond_schedule_is_refused_with_the_reachable_maximum():
    denoiser = DiffusionDenoiser(tiny_unet(), linear())
    assert denoiser.max_sigma == pytest.approx(78.7, abs=0.1)
    with pytest.raises(ValueError, match=r"`sigma`=100 is beyond this diffusion schedule.*σ=78\.7"):
        denoiser.timestep_for_sigma(100.0)
    with pytest.raises(ValueError, match="`sigma` must be a finite number > 0"):
        denoiser.timestep_for_sigma(0.0)


def test_alphas_can_be_given_directly_and_are_validated():
    a = linear().alphas_cumprod
    assert DiffusionDenoiser(tiny_unet(), a).timestep_for_sigma(0.5) == 259
    assert DiffusionDenoiser(tiny_unet(), a.tolist()).timestep_for_sigma(0.5) == 259
    with pytest.raises(ValueError, match="non-increasing"):
        DiffusionDenoiser(tiny_unet(), a.flip(0))
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        DiffusionDenoiser(tiny_unet(), torch.linspace(1.0, 0.0, 10))
    with pytest.raises(TypeError, match="must be a diffusers scheduler"):
        DiffusionDenoiser(tiny_unet(), "linear")


# ---------------------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_oracle_unet_reconstructs_the_clean_image_exactly(prediction_type):
    torch.manual_seed(0)
    sched = cosine_schedule()
    x = torch.rand(3, 3, 8, 8) * 0.9 + 0.05
    oracle = OracleUNet(2 * x - 1, sched.alphas_cumprod, prediction_type)
    denoiser = DiffusionDenoiser(oracle, sched, kind="unconditional", prediction_type=prediction_type)
    for sigma in (0.25, 0.5, 1.0):
        noisy = x + sigma * torch.randn_like(x)
        out = denoiser(noisy, sigma)
        torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
        assert int(oracle.seen_timesteps[-1][0]) == denoiser.timestep_for_sigma(sigma)


def test_predict_epsilon_returns_the_true_noise_of_the_forward_process():
    torch.manual_seed(0)
    sched = linear()
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    denoiser = DiffusionDenoiser(OracleUNet(x0, sched.alphas_cumprod), sched, kind="unconditional")
    t = torch.tensor([0, 10, 500, 999])
    eps = torch.randn_like(x0)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(denoiser.predict_epsilon(x_t, t), eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(denoiser.predict_x0(x_t, t), x0, atol=1e-4, rtol=0)


def test_learned_variance_channels_are_dropped():
    unet = tiny_unet(channels=3, out_channels=6)
    denoiser = DiffusionDenoiser(unet, cosine_schedule())
    assert denoiser.learned_variance and denoiser.image_channels == 3
    x_t = torch.randn(2, 3, 16, 16)
    eps = denoiser.predict_epsilon(x_t, 100)
    with torch.no_grad():
        full = unet(x_t, torch.tensor([100, 100])).sample
    torch.testing.assert_close(eps, full[:, :3])
    assert denoiser(torch.rand(2, 3, 16, 16), 0.25).shape == (2, 3, 16, 16)


# ------------------------------------------------------------------------------- model kinds: IF-II
def test_if_superres_call_matches_the_if_ii_convention():
    t5, tok = tiny_t5(width=12), tiny_tokenizer()
    unet = tiny_if_unet(t5_width=12, size=16)
    denoiser = DiffusionDenoiser(unet, cosine_schedule(), text_encoder=t5, tokenizer=tok)
    assert (denoiser.kind, denoiser.image_channels, denoiser.learned_variance) == ("if_superres", 3, True)

    calls = []
    unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    x = torch.rand(2, 3, 24, 24)
    for sigma, noise_level in [(0.25, 289 * 1.8), (1.0, 1000.0)]:
        with torch.no_grad():
            out = denoiser(x + sigma * torch.randn_like(x), sigma)
        assert out.shape == (2, 3, 24, 24) and float(out.min()) >= 0 and float(out.max()) <= 1
        (sample, timestep), kwargs = calls[-1]
        assert sample.shape == (2, 6, 16, 16)  # resized to the UNet's sample size
        torch.testing.assert_close(sample[:, :3], sample[:, 3:])  # the noisy image is its own condition
        assert timestep.tolist() == [denoiser.timestep_for_sigma(sigma)] * 2
        torch.testing.assert_close(kwargs["class_labels"], torch.full((2,), noise_level))
        assert kwargs["encoder_hidden_states"].shape == (2, 77, 12)  # T5 prompts padded to 77 as in IF


def test_if_superres_predict_epsilon_at_per_sample_timesteps():
    denoiser = DiffusionDenoiser(
        tiny_if_unet(), cosine_schedule(), text_encoder=tiny_t5(), tokenizer=tiny_tokenizer()
    )
    calls = []
    denoiser.unet.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    x_t = torch.randn(3, 3, 16, 16, requires_grad=True)
    eps = denoiser.predict_epsilon(x_t, torch.tensor([10, 400, 900]))
    assert eps.shape == (3, 3, 16, 16)
    torch.testing.assert_close(calls[-1]["class_labels"], torch.tensor([18.0, 720.0, 1000.0]))
    eps.sum().backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0


def test_if_superres_embeddings_width_must_match_the_unet():
    with pytest.raises(ValueError, match="has width 16 but the UNet expects 12"):
        DiffusionDenoiser(
            tiny_if_unet(t5_width=12), cosine_schedule(), text_encoder=tiny_t5(16), tokenizer=tiny_tokenizer()
        )


# ------------------------------------------------------------------------------- model kinds: text
def test_text_kind_caches_prompts_and_selects_class_prompts_by_label():
    clip, tok = tiny_clip(), tiny_tokenizer()
    encoder_calls = []
    clip.register_forward_hook(lambda m, a, o: encoder_calls.append(a[0].shape[0]))
    denoiser = DiffusionDenoiser(
        tiny_text_unet(), linear(), text_encoder=clip, tokenizer=tok, class_prompts=["a photo of zero", "one"]
    )
    assert denoiser.kind == "text" and denoiser.prompt == ""
    x = torch.rand(4, 1, 16, 16)
    labels = torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        uncond = denoiser(x, 0.5)
        cond = denoiser(x, 0.5, labels=labels)
        cond_again = denoiser(x, 0.5, labels=labels)
        denoiser(x, 0.5)
    assert sum(encoder_calls) == 3  # "", then both class prompts once; later calls hit the cache
    torch.testing.assert_close(cond, cond_again)
    assert not torch.allclose(uncond, cond)
    # per-class prompt embeddings follow the labels
    with torch.no_grad():
        only_zero = denoiser(x[:1], 0.5, labels=torch.tensor([0]))
    torch.testing.assert_close(only_zero, cond[:1], atol=1e-5, rtol=0)
    denoiser.prompt = "this is a digit"
    with torch.no_grad():
        assert not torch.allclose(denoiser(x, 0.5), uncond)


def test_text_kind_roundtrips_through_from_pretrained_in_pipeline_layout(tmp_path):
    unet, sched, clip, tok = tiny_text_unet(size=12), linear(), tiny_clip(), tiny_tokenizer()
    save_t2i(tmp_path, unet, sched, clip, tok)
    prompts = ["a photo of zero", "a photo of one"]
    direct = DiffusionDenoiser(unet, sched, text_encoder=clip, tokenizer=tok, class_prompts=prompts)
    loaded = DiffusionDenoiser.from_pretrained(tmp_path, class_prompts=prompts)
    assert loaded.kind == "text" and loaded.sample_size == (12, 12) and loaded.image_channels == 1
    assert loaded.timestep_for_sigma(0.25) == 145
    torch.manual_seed(0)
    x = torch.rand(3, 1, 28, 28) + 0.5 * torch.randn(3, 1, 28, 28)
    labels = torch.tensor([1, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 0.5), direct(x, 0.5), atol=0, rtol=0)
        torch.testing.assert_close(
            loaded(x, 0.5, labels=labels), direct(x, 0.5, labels=labels), atol=0, rtol=0
        )


def test_release_text_encoder_keeps_cached_prompts_only():
    denoiser = DiffusionDenoiser(
        tiny_text_unet(),
        linear(),
        text_encoder=tiny_clip(),
        tokenizer=tiny_tokenizer(),
        class_prompts=["zero"],
    )
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        before = denoiser(x, 0.25, labels=torch.tensor([0, 0]))
        denoiser.release_text_encoder()
        assert denoiser.text_encoder is None
        torch.testing.assert_close(denoiser(x, 0.25, labels=torch.tensor([0, 0])), before)
    with pytest.raises(ValueError, match="no embedding is cached for prompt 'two'"):
        denoiser.prompt = "two"


def test_text_kind_runs_from_precomputed_embeddings_without_an_encoder():
    emb = torch.randn(1, 5, 16)
    denoiser = DiffusionDenoiser(tiny_text_unet(), linear(), prompt_embeds={"": emb})
    assert denoiser(torch.rand(2, 1, 16, 16), 0.25).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="no embedding is cached for prompt ''"):
        DiffusionDenoiser(tiny_text_unet(), linear())


# ------------------------------------------------------------------------------ loading real layouts
def test_from_pretrained_reads_the_flat_ddpm_cifar10_layout(tmp_path):
    """google/ddpm-cifar10-32 keeps config.json + weights and scheduler_config.json at the repo root."""
    unet = tiny_unet(size=8)
    unet.save_pretrained(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(
        json.dumps(
            {
                "_class_name": "GaussianDDPMScheduler",
                "beta_end": 0.02,
                "beta_schedule": "linear",
                "beta_start": 0.0001,
                "timesteps": 1000,
                "variance_type": "fixed_large",
            }
        )
    )
    denoiser = DiffusionDenoiser.from_pretrained(str(tmp_path))
    assert denoiser.kind == "unconditional" and denoiser.sample_size == (8, 8)
    assert [denoiser.timestep_for_sigma(s) for s in (0.25, 0.5, 1.0)] == [145, 259, 396]
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x, 0.25), DiffusionDenoiser(unet, linear())(x, 0.25))


def test_from_pretrained_reads_an_if_ii_pipeline_layout_and_can_drop_the_encoder(tmp_path):
    unet, t5, tok = tiny_if_unet(), tiny_t5(), tiny_tokenizer()
    save_t2i(tmp_path, unet, cosine_schedule(), t5, tok)
    loaded = DiffusionDenoiser.from_pretrained(tmp_path, keep_text_encoder=False, torch_dtype=torch.float64)
    assert loaded.kind == "if_superres" and loaded.text_encoder is None and loaded.dtype == torch.float64
    direct = DiffusionDenoiser(unet.double(), cosine_schedule(), text_encoder=t5.double(), tokenizer=tok)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 0.5), direct(x, 0.5))


def test_from_pretrained_refuses_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        DiffusionDenoiser.from_pretrained(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- class-conditional
def test_class_conditional_unet_needs_labels():
    denoiser = DiffusionDenoiser(tiny_unet(num_class_embeds=3), linear())
    assert denoiser.kind == "class_conditional"
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="`labels` are required"):
        denoiser(x, 0.25)
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 2\]"):
        denoiser(x, 0.25, labels=torch.tensor([0, 3]))
    with torch.no_grad():
        a = denoiser(x, 0.25, labels=torch.tensor([0, 0]))
        b = denoiser(x, 0.25, labels=torch.tensor([1, 2]))
    assert not torch.allclose(a, b)


# ------------------------------------------------------------------------- general behaviour
def test_batched_result_equals_one_by_one():
    denoiser = DiffusionDenoiser(tiny_unet(), cosine_schedule())
    torch.manual_seed(0)
    x = torch.rand(5, 3, 20, 20) + 0.25 * torch.randn(5, 3, 20, 20)
    with torch.no_grad():
        batched = denoiser(x, 0.25)
        single = torch.cat([denoiser(x[i : i + 1], 0.25) for i in range(5)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_gradients_reach_the_input_through_resizing():
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(3 * 20 * 20, 4))
    model = DenoisedClassifier(DiffusionDenoiser(tiny_unet(), cosine_schedule()), classifier, sigma=0.25)
    x = (torch.rand(2, 3, 20, 20) + 0.25 * torch.randn(2, 3, 20, 20)).requires_grad_(True)
    logits = model(x)
    assert logits.shape == (2, 4)
    torch.testing.assert_close(logits, classifier(model.denoiser(x, 0.25)))
    logits.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and x.grad.abs().sum() > 0


def test_dtype_follows_the_unet():
    denoiser = DiffusionDenoiser(tiny_unet().double(), cosine_schedule())
    out = denoiser(torch.rand(2, 3, 16, 16), 0.5)  # float32 in, float64 model
    assert out.dtype == torch.float64 and denoiser.dtype == torch.float64
    assert denoiser.predict_epsilon(torch.randn(1, 3, 16, 16), 3).dtype == torch.float64


def test_grayscale_input_into_rgb_denoiser_is_repeated_and_averaged_back():
    denoiser = DiffusionDenoiser(tiny_unet(), cosine_schedule())
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        out = denoiser(x, 0.5)
        via_rgb = denoiser(x.repeat(1, 3, 1, 1), 0.5).mean(dim=1, keepdim=True)
    assert out.shape == (2, 1, 16, 16)
    torch.testing.assert_close(out, via_rgb)


def test_rgb_input_into_grayscale_denoiser_is_refused():
    denoiser = DiffusionDenoiser(tiny_unet(channels=1), cosine_schedule())
    with pytest.raises(ValueError, match="has 3 channels but the denoiser's UNet works on 1-channel images"):
        denoiser(torch.rand(1, 3, 16, 16), 0.25)
    with pytest.raises(ValueError, match=r"must have 1 channel\(s\)"):
        denoiser(torch.rand(1, 2, 16, 16), 0.25)


def test_noisy_input_outside_unit_range_is_accepted_and_output_is_in_range():
    denoiser = DiffusionDenoiser(tiny_unet(), cosine_schedule())
    with torch.no_grad():
        out = denoiser(torch.randn(2, 3, 16, 16) * 3, 1.0)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ([[0.5]], TypeError, "`x_noisy` must be a torch.Tensor"),
        (torch.rand(3, 16, 16), ValueError, r"4 dimensions.*unsqueeze\(0\)"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), TypeError, "floating-point"),
        (torch.full((1, 3, 16, 16), float("nan")), ValueError, "NaN or infinite"),
        (torch.rand(0, 3, 16, 16), ValueError, "at least one image"),
    ],
)
def test_bad_images_are_refused(bad, error, match):
    denoiser = DiffusionDenoiser(tiny_unet(), cosine_schedule())
    with pytest.raises(error, match=match):
        denoiser(bad, 0.25)


def test_bad_timesteps_labels_and_arguments_are_refused():
    denoiser = DiffusionDenoiser(tiny_unet(), cosine_schedule())
    x_t = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"`timesteps` must be an integer in \[0, 999\]"):
        denoiser.predict_epsilon(x_t, 1000)
    with pytest.raises(ValueError, match=r"`timesteps` must lie in \[0, 999\]"):
        denoiser.predict_epsilon(x_t, torch.tensor([5, -1]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        denoiser.predict_epsilon(x_t, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="must hold integers"):
        denoiser.predict_x0(x_t, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"`x_t` must have 3 channel\(s\)"):
        denoiser.predict_x0(torch.randn(2, 1, 16, 16), 5)
    with pytest.raises(ValueError, match=r"`labels` must have shape \(2,\)"):
        denoiser(torch.rand(2, 3, 16, 16), 0.25, labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="only apply to text-conditioned UNets"):
        DiffusionDenoiser(tiny_unet(), cosine_schedule(), prompt="a photo")
    with pytest.raises(ValueError, match="`kind` must be one of"):
        DiffusionDenoiser(tiny_unet(), cosine_schedule(), kind="latent")
    with pytest.raises(TypeError, match="`unet` must be a torch.nn.Module"):
        DiffusionDenoiser(lambda x: x, cosine_schedule())
    with pytest.raises(ValueError, match="`sigma` must be a finite number > 0"):
        DenoisedClassifier(denoiser, nn.Identity(), sigma=-0.25)


def test_latent_unet_is_refused_with_a_hint():
    latent = tiny_text_unet(channels=4, size=8)
    with pytest.raises(ValueError, match="looks like a latent diffusion model"):
        DiffusionDenoiser(latent, linear())


def test_repr_shows_the_hyper_parameters():
    text = repr(
        DiffusionDenoiser(
            tiny_text_unet(), linear(), prompt_embeds={"a photo": torch.zeros(1, 3, 16)}, prompt="a photo"
        )
    )
    for part in [
        "kind='text'",
        "image_channels=1",
        "sample_size=(16, 16)",
        "prompt='a photo'",
        "timesteps=1000",
    ]:
        assert part in text
    model = DenoisedClassifier(DiffusionDenoiser(tiny_unet(), cosine_schedule()), nn.Identity(), sigma=0.5)
    assert "sigma=0.5" in repr(model) and "timestep=496" in repr(model)


def test_lora_on_the_unet_trains_through_predict_epsilon_and_the_text_encoder_stays_frozen():
    from peft import LoraConfig

    denoiser = DiffusionDenoiser(
        tiny_if_unet(),
        cosine_schedule(),
        text_encoder=tiny_t5(),
        tokenizer=tiny_tokenizer(),
        class_prompts=["zero", "one"],
    )
    denoiser.unet.requires_grad_(False)
    denoiser.unet.add_adapter(
        LoraConfig(
            r=2,
            lora_alpha=2,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights="gaussian",
        )
    )
    trainable = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    torch.manual_seed(0)
    x0, eps, t = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 3, 16, 16), torch.tensor([100, 700])
    a = denoiser.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    loss = (denoiser.predict_epsilon(x_t, t, labels=torch.tensor([0, 1])) - eps).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in trainable.values())
    assert sum(float(p.grad.abs().sum()) for p in trainable.values()) > 0
