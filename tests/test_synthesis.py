"""Tests of reference synthesis with tiny random-weight pipelines built from config (no Hub access)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    IFPipeline,
    IFSuperResolutionPipeline,
    StableDiffusionPipeline,
)
from PIL import Image
from pydantic import ValidationError
from tiny_models import (
    clip_text_encoder,
    cosine_schedule,
    save_t2i,
    t5_encoder,
    tiny_if_unet,
    tiny_text_unet,
    word_tokenizer,
)
from transformers import CLIPTokenizer

from nodata_defense.config import SynthesisConfig
from nodata_defense.synthesis import (
    CallableGenerator,
    DeepFloydIFGenerator,
    DiffusersText2ImageGenerator,
    PixelDiffusionGenerator,
    ReferenceSet,
    build_prompts,
    image_seed,
    load_reference_folder,
    synthesize,
)

pytestmark = pytest.mark.usefixtures("one_thread")


CLASSES = ["cat", "dog", "bird"]
WORDS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "this", "is", "a", "photo", "of", "cat", "dog", "bird", "fish"]
FAST = {"num_inference_steps": 2, "batch_size": 2}


# ----------------------------------------------------------------------------------------- builders
@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory) -> Path:
    """A tiny pixel text-to-image model saved in the diffusers layout the bundled digits model uses."""
    return save_t2i(
        tmp_path_factory.mktemp("pixel") / "tiny-t2i",
        tiny_text_unet(size=8),
        cosine_schedule(),
        clip_text_encoder(len(WORDS), 10),
        word_tokenizer(WORDS, 10, lowercase=True),
    )


@pytest.fixture(scope="module")
def pixel(pixel_dir) -> PixelDiffusionGenerator:
    return PixelDiffusionGenerator.from_pretrained(pixel_dir)


def clip_tokenizer(directory: Path, max_length: int = 12) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over a toy vocabulary: every word of WORDS merges up from its letters."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges = []
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for word in (w for w in WORDS if not w.startswith("[")):
        current = word[0]
        for i, ch in enumerate(word[1:], start=1):
            piece = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{current} {piece}")
            current += piece
            vocab.setdefault(current, len(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer.from_pretrained(directory, model_max_length=max_length)


def tiny_sd(tmp_path: Path) -> StableDiffusionPipeline:
    tokenizer = clip_tokenizer(tmp_path / "clip_tokenizer")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=clip_text_encoder(len(tokenizer), 12, pad_token_id=1, bos_token_id=0, eos_token_id=1),
        tokenizer=tokenizer,
        unet=tiny_text_unet(4, size=8),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def if_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
    )


def tiny_if(t5_width: int = 12, stage2_steps: int = 2) -> DeepFloydIFGenerator:
    tokenizer = word_tokenizer(WORDS, None, bos=False)
    t5 = t5_encoder(len(WORDS), t5_width)
    no_safety = {
        "safety_checker": None,
        "feature_extractor": None,
        "watermarker": None,
        "requires_safety_checker": False,
    }
    stage1 = IFPipeline(
        tokenizer=tokenizer,
        text_encoder=t5,
        unet=tiny_if_unet(t5_width, 8, in_channels=3, class_embed_type=None),
        scheduler=if_scheduler(),
        **no_safety,
    )
    # Stage II has no text encoder at all, as the paper loads it: it can only run on stage I's embeddings.
    stage2 = IFSuperResolutionPipeline(
        tokenizer=None,
        text_encoder=None,
        unet=tiny_if_unet(t5_width, 16),
        scheduler=if_scheduler(),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        **no_safety,
    )
    return DeepFloydIFGenerator(
        stage1, stage2, id="tiny-if-I", stage2_id="tiny-if-II", stage2_steps=stage2_steps
    )


class CountingGenerator:
    """A cheap deterministic generator: image = f(prompt, seed); records every call."""

    def __init__(
        self, id: str = "counting", size: int = 6, channels: int = 3, crash_after: int | None = None
    ):
        self.id = id
        self.revision = None
        self.size = size
        self.channels = channels
        self.crash_after = crash_after
        self.calls: list[list[str]] = []

    @property
    def settings(self) -> dict:
        return {"size": self.size}

    def generate(self, prompts, seeds, *, guidance_scale, num_inference_steps):
        if self.crash_after is not None and len(self.calls) == self.crash_after:
            raise RuntimeError("simulated crash")
        self.calls.append(list(prompts))
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            g = torch.Generator().manual_seed(
                seed + len(prompt) + int(guidance_scale * 10) + num_inference_steps
            )
            out.append(torch.rand(self.channels, self.size, self.size, generator=g))
        return torch.stack(out)


class Crashing:
    """Wraps a generator and raises after ``after`` successful batches (a crash mid-run)."""

    def __init__(self, inner, after: int):
        self.inner, self.after, self.calls = inner, after, 0
        self.id, self.revision = inner.id, inner.revision

    @property
    def settings(self):
        return self.inner.settings

    def generate(self, prompts, seeds, **kwargs):
        if self.calls == self.after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return self.inner.generate(prompts, seeds, **kwargs)


def is_8bit(images: torch.Tensor) -> bool:
    return bool(torch.equal(torch.round(images * 255) / 255, images))


def manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())["entries"]


# ------------------------------------------------------------------------------------------ prompts
def test_prompts_cycle_templates_over_shots_and_use_class_prompts():
    config = SynthesisConfig(
        templates=["This is a photo of a {}", "a {} photo"], shots_per_class=3, class_prompts={"dog": "puppy"}
    )
    prompts = build_prompts(["cat", "dog"], config)
    assert prompts == [
        ["This is a photo of a cat", "a cat photo", "This is a photo of a cat"],
        ["This is a photo of a puppy", "a puppy photo", "This is a photo of a puppy"],
    ]


def test_image_seed_depends_on_class_name_and_shot_not_on_position():
    seeds = {image_seed(0, name, shot) for name in CLASSES for shot in range(3)}
    assert len(seeds) == 9
    assert image_seed(0, "dog", 1) == image_seed(0, "dog", 1) != image_seed(1, "dog", 1)
    assert all(0 <= s < 2**63 for s in seeds)


# ------------------------------------------------------------------------------- the pixel back-end
def test_pixel_generator_loaded_from_pipeline_layout_gives_labelled_unit_images(pixel, pixel_dir):
    refs = synthesize(CLASSES, pixel, SynthesisConfig(shots_per_class=2, seed=3, **FAST))
    assert len(refs) == 6 and refs.image_shape == (1, 8, 8)
    assert refs.images.dtype == torch.float32 and refs.images.device.type == "cpu"
    assert float(refs.images.min()) >= 0.0 and float(refs.images.max()) <= 1.0
    assert is_8bit(refs.images)
    assert refs.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert refs.prompts[2] == "This is a photo of a dog"
    assert refs.class_names == CLASSES
    assert refs.metadata["generator"]["id"] == "tiny-t2i"  # the directory's name
    assert refs.metadata["generator"]["revision"].startswith("sha256:")
    assert refs.metadata["guidance_scale"] == 4.0  # the paper's rule for more than one shot
    assert refs.metadata["seeds"] == [image_seed(3, c, s) for c in CLASSES for s in range(2)]
    assert "PixelDiffusionGenerator(id='tiny-t2i'" in repr(pixel)


def test_pixel_generator_is_deterministic_and_independent_of_batch_size(pixel):
    config = SynthesisConfig(shots_per_class=2, **FAST)
    first = synthesize(CLASSES, pixel, config)
    again = synthesize(CLASSES, pixel, config.model_copy(update={"batch_size": 5}))
    other = synthesize(CLASSES, pixel, config.model_copy(update={"seed": 1}))
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)


def test_pixel_guidance_runs_the_empty_prompt_as_unconditional_branch(pixel, monkeypatch):
    seen = []
    forward = pixel.unet.forward

    def spy(sample, timestep, encoder_hidden_states, **kwargs):
        seen.append(encoder_hidden_states)
        return forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)

    monkeypatch.setattr(pixel.unet, "forward", spy)
    pixel.generate(["This is a photo of a cat"], [0], guidance_scale=3.0, num_inference_steps=2)
    assert len(seen) == 2 and seen[0].shape[0] == 2  # [unconditional; conditional] in one call
    empty = pixel._encode([""])[0]
    cat = pixel._encode(["This is a photo of a cat"])[0]
    assert torch.equal(seen[0][0], empty) and torch.equal(seen[0][1], cat)
    seen.clear()
    pixel.generate(["This is a photo of a cat"], [0], guidance_scale=1.0, num_inference_steps=2)
    assert seen[0].shape[0] == 1  # no guidance: the prompt branch only


def test_pixel_generator_samples_with_the_given_scheduler_too(pixel_dir):
    generator = PixelDiffusionGenerator.from_pretrained(pixel_dir, sampler="scheduler")
    images = generator.generate(["a photo of a cat"] * 2, [5, 6], guidance_scale=2.0, num_inference_steps=3)
    assert images.shape == (2, 1, 8, 8) and float(images.min()) >= 0 and float(images.max()) <= 1
    assert not torch.equal(images[0], images[1])


def test_pixel_from_pretrained_refuses_an_incomplete_directory(tmp_path):
    tiny_text_unet(size=8).save_pretrained(tmp_path / "model" / "unet")
    with pytest.raises(FileNotFoundError, match=r"lacks the subfolder\(s\) \['scheduler', 'text_encoder'"):
        PixelDiffusionGenerator.from_pretrained(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        PixelDiffusionGenerator.from_pretrained(tmp_path / "absent")


def test_local_model_id_is_its_name_and_revision_follows_its_weights(tmp_path, pixel_dir):
    import shutil

    copy = shutil.copytree(pixel_dir, tmp_path / "moved" / "tiny-t2i")
    original, moved = (
        PixelDiffusionGenerator.from_pretrained(pixel_dir),
        PixelDiffusionGenerator.from_pretrained(copy),
    )
    assert (moved.id, moved.revision) == (original.id, original.revision)  # a moved model keeps its cache
    (copy / "README.md").write_text("retrained? no, just documented")
    assert PixelDiffusionGenerator.from_pretrained(copy).revision == original.revision
    config = json.loads((copy / "scheduler" / "scheduler_config.json").read_text())
    (copy / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(config | {"beta_schedule": "linear"})
    )
    assert PixelDiffusionGenerator.from_pretrained(copy).revision != original.revision
    assert PixelDiffusionGenerator.from_pretrained(copy, id="mine").id == "mine"


# ------------------------------------------------------------------------- diffusers text-to-image
def test_stable_diffusion_pipeline_back_end(tmp_path):
    generator = DiffusersText2ImageGenerator(tiny_sd(tmp_path), id="tiny-sd")
    config = SynthesisConfig(shots_per_class=2, **FAST)
    refs = synthesize(CLASSES[:2], generator, config)
    assert refs.image_shape == (3, 16, 16) and refs.labels.tolist() == [0, 0, 1, 1]
    assert float(refs.images.min()) >= 0 and float(refs.images.max()) <= 1 and is_8bit(refs.images)
    again = synthesize(CLASSES[:2], generator, config.model_copy(update={"batch_size": 1}))
    assert torch.equal(refs.images, again.images)  # one torch.Generator per image
    assert refs.metadata["generator"]["settings"]["pipeline"] == "StableDiffusionPipeline"
    resized = synthesize(CLASSES[:1], generator, config.model_copy(update={"image_size": 10}))
    assert resized.image_shape == (3, 10, 10)


# Importing AutoPipelineForText2Image imports every pipeline; one of them calls torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_diffusers_generator_loads_a_saved_pipeline_directory(tmp_path):
    pipe = tiny_sd(tmp_path)
    pipe.save_pretrained(tmp_path / "tiny-sd")
    loaded = DiffusersText2ImageGenerator.from_pretrained(tmp_path / "tiny-sd", safety_checker=None)
    assert loaded.id == "tiny-sd" and loaded.revision.startswith("sha256:")
    config = SynthesisConfig(**FAST)
    direct = synthesize(["cat"], DiffusersText2ImageGenerator(pipe, id="direct"), config)
    assert torch.equal(synthesize(["cat"], loaded, config).images, direct.images)


def test_diffusers_generator_refuses_call_kwargs_it_controls(tmp_path):
    with pytest.raises(ValueError, match=r"must not set \['guidance_scale'\]"):
        DiffusersText2ImageGenerator(lambda **kw: None, call_kwargs={"guidance_scale": 3.0})


# ------------------------------------------------------------------------------------- DeepFloyd IF
class Spy:
    """Delegates to a pipeline and records the keyword arguments of each call."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.pipe(**kwargs)


def test_deepfloyd_if_two_stages_share_stage_one_embeddings():
    generator = tiny_if()
    generator.stage1, generator.stage2 = Spy(generator.stage1), Spy(generator.stage2)
    refs = synthesize(["cat", "dog"], generator, SynthesisConfig(**FAST))
    assert refs.image_shape == (3, 16, 16)  # stage II's resolution (the paper: 64 -> 256)
    assert float(refs.images.min()) >= 0 and float(refs.images.max()) <= 1 and is_8bit(refs.images)
    first, second = generator.stage1.calls[0], generator.stage2.calls[0]
    assert first["guidance_scale"] == 7.0 and first["num_inference_steps"] == 2  # one shot: the paper's 7.0
    assert (
        second["guidance_scale"] == 4.0
        and second["num_inference_steps"] == 2
        and second["noise_level"] == 250
    )
    assert torch.equal(second["prompt_embeds"], first["prompt_embeds"])
    assert second["image"].shape[-1] == 8 and first["clean_caption"] is False
    assert refs.metadata["generator"]["settings"]["stage2_id"] == "tiny-if-II"


def test_deepfloyd_if_free_stage_one_gives_the_same_images_and_frees_it(tmp_path):
    config = SynthesisConfig(shots_per_class=2, **FAST)
    plain = synthesize(["cat", "dog"], tiny_if(), config)
    generator = tiny_if()
    freeing = config.model_copy(update={"free_stage_one": True, "batch_size": 3})
    freed = synthesize(["cat", "dog"], generator, freeing, cache_dir=tmp_path)
    assert torch.equal(plain.images, freed.images)
    assert generator.stage1 is None and "stage_one_loaded=False" in repr(generator)
    cached = synthesize(["cat", "dog"], generator, freeing, cache_dir=tmp_path)  # needs no stage I
    assert cached.metadata["cache"]["hits"] == 4 and torch.equal(cached.images, plain.images)
    with pytest.raises(RuntimeError, match="stage I of this DeepFloydIFGenerator was freed"):
        synthesize(["fish"], generator, config)


def test_deepfloyd_if_from_pretrained_loads_stage_two_without_text_encoder(tmp_path):
    built = tiny_if()
    built.stage1.save_pretrained(tmp_path / "if-I")
    built.stage2.save_pretrained(tmp_path / "if-II")
    loaded = DeepFloydIFGenerator.from_pretrained(tmp_path / "if-I", tmp_path / "if-II", stage2_steps=2)
    assert loaded.stage2.text_encoder is None and loaded.stage1.safety_checker is None
    assert (loaded.id, loaded.stage2_id) == ("if-I", "if-II")
    config = SynthesisConfig(**FAST)
    assert torch.equal(synthesize(["cat"], loaded, config).images, synthesize(["cat"], built, config).images)


# ----------------------------------------------------------------------------------- callable
def test_callable_generator_accepts_pil_lists_and_arrays():
    def pil_fn(prompts, generator):
        values = torch.randint(0, 256, (len(prompts),), generator=generator).tolist()
        return [Image.new("RGB", (5, 4), (v, 0, 255)) for v in values]

    refs = synthesize(CLASSES, CallableGenerator(pil_fn, id="pil"), SynthesisConfig(**FAST))
    assert refs.image_shape == (3, 4, 5) and float(refs.images[:, 2].min()) == 1.0

    def array_fn(prompts, generator):
        return np.full((len(prompts), 4, 4, 1), 0.5, dtype=np.float32)

    refs = synthesize(CLASSES, CallableGenerator(array_fn, id="array"), SynthesisConfig(**FAST))
    assert refs.image_shape == (1, 4, 4) and torch.allclose(
        refs.images, torch.full_like(refs.images, 128 / 255)
    )


def test_callable_generator_per_image_calls_are_independent_of_batching():
    def fn(prompts, generator):
        return torch.rand(len(prompts), 3, 4, 4, generator=generator)

    generator = CallableGenerator(fn, id="rand", batched=False)
    config = SynthesisConfig(shots_per_class=2, **FAST)
    a = synthesize(CLASSES, generator, config)
    b = synthesize(CLASSES, generator, config.model_copy(update={"batch_size": 4}))
    assert torch.equal(a.images, b.images)


@pytest.mark.parametrize(
    ("output", "error", "match"),
    [
        (torch.rand(1, 3, 4, 4), ValueError, r"returned 1 image\(s\) for 2 prompt\(s\)"),
        (torch.rand(2, 3, 4, 4) * 255, ValueError, r"must hold pixel values in \[0, 1\]"),
        ("not images", TypeError, "must return a float tensor"),
    ],
)
def test_callable_generator_bad_outputs_are_refused(output, error, match):
    with pytest.raises(error, match=match):
        synthesize(["cat", "dog"], CallableGenerator(lambda p, g: output, id="bad"), SynthesisConfig(**FAST))


# ------------------------------------------------------------------------------------------ cache
def test_cache_rerun_makes_no_generator_call_and_equals_fresh(tmp_path, pixel):
    config = SynthesisConfig(shots_per_class=2, **FAST)
    counting = CountingGenerator()
    fresh = synthesize(CLASSES, counting, config, cache_dir=tmp_path)
    assert len(counting.calls) == 3 and fresh.metadata["cache"]["generated"] == 6
    again = synthesize(CLASSES, counting, config, cache_dir=tmp_path)
    assert len(counting.calls) == 3  # nothing generated
    assert again.metadata["cache"] == {"dir": str(tmp_path), "hits": 6, "generated": 0}
    assert torch.equal(fresh.images, again.images) and again.labels.tolist() == fresh.labels.tolist()
    # A real model: the cached PNGs reproduce the fresh 8-bit images exactly.
    model_fresh = synthesize(CLASSES, pixel, config, cache_dir=tmp_path / "pixel")
    model_cached = synthesize(CLASSES, pixel, config, cache_dir=tmp_path / "pixel")
    assert model_cached.metadata["cache"]["hits"] == 6 and torch.equal(
        model_fresh.images, model_cached.images
    )


def test_cache_manifest_records_every_image(tmp_path):
    config = SynthesisConfig(shots_per_class=2, seed=7, image_size=4, **FAST)
    refs = synthesize(CLASSES, CountingGenerator(), config, cache_dir=tmp_path)
    entries = manifest(tmp_path)
    assert len(entries) == 6
    by_seed = {e["seed"]: e for e in entries.values()}
    for i, seed in enumerate(refs.metadata["seeds"]):
        entry = by_seed[seed]
        assert entry["class"] == CLASSES[refs.labels[i]] and entry["label"] == int(refs.labels[i])
        assert entry["prompt"] == refs.prompts[i] and entry["shot"] == i % 2
        assert entry["generator"] == {"id": "counting", "revision": None, "settings": {"size": 6}}
        assert (
            entry["guidance_scale"] == 4.0 and entry["num_inference_steps"] == 2 and entry["image_size"] == 4
        )
        assert entry["shape"] == [3, 4, 4]
        data = (tmp_path / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert entry["file"].startswith(f"images/{entry['class']}/") and entry["file"].endswith(".png")
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes left no temporary file


def test_cache_resumes_after_a_crash_mid_run(tmp_path, pixel):
    config = SynthesisConfig(shots_per_class=2, **FAST)  # 6 images, 3 batches of 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        synthesize(CLASSES, Crashing(pixel, after=2), config, cache_dir=tmp_path)
    assert len(manifest(tmp_path)) == 4  # the two finished batches were saved
    resumed = Crashing(pixel, after=99)
    refs = synthesize(CLASSES, resumed, config, cache_dir=tmp_path)
    assert resumed.calls == 1 and refs.metadata["cache"] == {"dir": str(tmp_path), "hits": 4, "generated": 2}
    assert torch.equal(refs.images, synthesize(CLASSES, pixel, config).images)


KILLED_RUN = """
import os, time, torch
from nodata_defense.config import SynthesisConfig
from nodata_defense.synthesis import CallableGenerator, synthesize

MARKER = os.environ.get("SYNTHESIS_TEST_MARKER")

def draw(prompts, generator):
    images = os.path.join(os.environ.get("SYNTHESIS_TEST_CACHE", ""), "images")
    if MARKER and os.path.isdir(images) and len(os.listdir(images)) >= 2:
        open(MARKER, "w").close()  # two classes are on disk: wait here to be killed
        time.sleep(600)
    return torch.rand(len(prompts), 3, 4, 4, generator=generator)

generator = CallableGenerator(draw, id="killed", batched=False)
config = SynthesisConfig(shots_per_class=2, num_inference_steps=2, batch_size=2)
if __name__ == "__main__":
    synthesize(["cat", "dog", "bird"], generator, config, cache_dir=os.environ["SYNTHESIS_TEST_CACHE"])
"""


def test_cache_resumes_after_the_process_is_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    script, cache, marker = tmp_path / "run.py", tmp_path / "cache", tmp_path / "waiting"
    script.write_text(KILLED_RUN)
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "SYNTHESIS_TEST_CACHE": str(cache),
        "SYNTHESIS_TEST_MARKER": str(marker),
    }
    child = subprocess.Popen([sys.executable, str(script)], env=env)
    try:
        deadline = time.time() + 120
        while not marker.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the child never reached its third batch"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert len(manifest(cache)) == 4 and not list(cache.rglob("*.tmp"))
    namespace: dict = {}
    exec(compile(KILLED_RUN, "run.py", "exec"), namespace)  # the same generator, without the kill
    resumed = synthesize(CLASSES, namespace["generator"], namespace["config"], cache_dir=cache)
    assert resumed.metadata["cache"]["hits"] == 4 and resumed.metadata["cache"]["generated"] == 2
    fresh = synthesize(CLASSES, namespace["generator"], namespace["config"])
    assert torch.equal(resumed.images, fresh.images)


def test_cache_changed_settings_invalidate_only_affected_entries(tmp_path):
    base = SynthesisConfig(shots_per_class=2, guidance_scale=5.0, **FAST)
    generator = CountingGenerator()
    synthesize(CLASSES, generator, base, cache_dir=tmp_path)

    def generated(config, classes=CLASSES, gen=generator):
        gen.calls.clear()
        refs = synthesize(classes, gen, config, cache_dir=tmp_path)
        return sorted(p for call in gen.calls for p in call), refs

    # One more shot: only the new shot of each class (the explicit guidance does not change).
    new, _ = generated(base.model_copy(update={"shots_per_class": 3}))
    assert new == ["This is a photo of a bird", "This is a photo of a cat", "This is a photo of a dog"]
    # A new class, reordered: only the new class; the others are found by name.
    new, refs = generated(base, ["fish", "dog", "cat", "bird"])
    assert new == ["This is a photo of a fish"] * 2 and refs.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    by_class = {e["class"]: e["label"] for e in manifest(tmp_path).values()}
    assert by_class["dog"] == 1  # labels are rewritten for the current class order
    # A per-class prompt: only that class.
    new, _ = generated(base.model_copy(update={"class_prompts": {"dog": "puppy"}}))
    assert new == ["This is a photo of a puppy"] * 2
    # Steps, guidance, size, seed and the generator each change every entry.
    for change in ({"num_inference_steps": 3}, {"guidance_scale": 6.0}, {"image_size": 3}, {"seed": 1}):
        new, _ = generated(base.model_copy(update=change))
        assert len(new) == 6, change
    new, _ = generated(base, gen=CountingGenerator(size=5))
    assert len(new) == 6
    new, _ = generated(base)
    assert new == []  # the original entries are all still there


def test_cache_regenerates_an_image_whose_file_was_altered(tmp_path):
    config = SynthesisConfig(**FAST)
    generator = CountingGenerator()
    first = synthesize(CLASSES, generator, config, cache_dir=tmp_path)
    entry = next(e for e in manifest(tmp_path).values() if e["class"] == "dog")
    Image.new("RGB", (6, 6)).save(tmp_path / entry["file"])  # a valid PNG, but not the recorded one
    (tmp_path / next(e for e in manifest(tmp_path).values() if e["class"] == "bird")["file"]).unlink()
    generator.calls.clear()
    again = synthesize(CLASSES, generator, config, cache_dir=tmp_path)
    assert sorted(generator.calls[0]) == ["This is a photo of a bird", "This is a photo of a dog"]
    assert torch.equal(first.images, again.images)


def test_cache_refuses_a_foreign_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text('{"something": "else"}')
    with pytest.raises(ValueError, match="is not a synthesis cache manifest"):
        synthesize(CLASSES, CountingGenerator(), SynthesisConfig(**FAST), cache_dir=tmp_path)


def test_progress_bar_is_quiet_by_default(capsys):
    synthesize(CLASSES, CountingGenerator(), SynthesisConfig(**FAST))
    assert capsys.readouterr().err == ""
    synthesize(CLASSES, CountingGenerator(), SynthesisConfig(show_progress=True, **FAST))
    assert "synthesis" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("class_names", "error", "match"),
    [
        ([], ValueError, "at least one class name"),
        (["cat", "dog", "cat"], ValueError, "distinct names; 'cat' appears at positions 0 and 2"),
        (["cat", ""], ValueError, r"class_names\[1\]` must be a non-empty string"),
        ("cat", TypeError, "must be a sequence of strings"),
    ],
)
def test_bad_class_names_are_refused(class_names, error, match):
    with pytest.raises(error, match=match):
        synthesize(class_names, CountingGenerator(), SynthesisConfig(**FAST))


def test_bad_configs_are_refused():
    with pytest.raises(ValidationError, match="shots_per_class"):
        SynthesisConfig(shots_per_class=0)
    with pytest.raises(ValidationError, match="exactly one '{}' slot"):
        SynthesisConfig(templates=["a photo of a cat"])
    with pytest.raises(ValueError, match=r"class_prompts` has key\(s\) \['cow'\] that are not class names"):
        synthesize(CLASSES, CountingGenerator(), SynthesisConfig(class_prompts={"cow": "a cow"}))
    with pytest.raises(TypeError, match="`config` must be a SynthesisConfig"):
        synthesize(CLASSES, CountingGenerator(), {"shots_per_class": 1})


def test_a_plain_function_is_refused_with_a_hint():
    with pytest.raises(TypeError, match=r"Wrap a function in CallableGenerator\(fn\)"):
        synthesize(CLASSES, lambda prompts, generator: None)


# -------------------------------------------------------------------------------------- folders
def write_folder(root: Path, classes=("cat", "dog"), size=(6, 5), count=2) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", size, (40 * c, 20 * i, 200)).save(root / name / f"{i:02d}.png")
    return root


def test_load_reference_folder_reads_each_class_in_order(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"\0")  # hidden files are ignored
    refs = load_reference_folder(tmp_path, ["dog", "cat"])
    assert refs.image_shape == (3, 5, 6) and refs.labels.tolist() == [0, 0, 1, 1]
    assert refs.metadata["files"] == ["dog/00.png", "dog/01.png", "cat/00.png", "cat/01.png"]
    assert refs.prompts[0] == "This is a photo of a dog"
    assert abs(float(refs.images[0, 0, 0, 0]) - 40 / 255) < 1e-6
    grey = load_reference_folder(tmp_path, ["cat"], channels=1, image_size=4, shots_per_class=1)
    assert grey.image_shape == (1, 4, 4) and len(grey) == 1


def test_load_reference_folder_errors(tmp_path):
    write_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"has no folder for class\(es\) \['bird'\]"):
        load_reference_folder(tmp_path, ["cat", "bird"])
    with pytest.raises(FileNotFoundError, match="is not one"):
        load_reference_folder(tmp_path / "nowhere", ["cat"])
    (tmp_path / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"holds non-image file\(s\) \['notes.txt'\]"):
        load_reference_folder(tmp_path, ["cat"])
    (tmp_path / "cat" / "notes.txt").unlink()
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_reference_folder(tmp_path, ["cat"])
    (tmp_path / "cat" / "broken.png").unlink()
    Image.new("RGB", (7, 7)).save(tmp_path / "cat" / "big.png")
    with pytest.raises(ValueError, match="different sizes .* pass `image_size`"):
        load_reference_folder(tmp_path, ["cat"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image"):
        load_reference_folder(tmp_path, ["empty"])


# ---------------------------------------------------------------------------------- ReferenceSet
def reference_set(n: int = 4) -> ReferenceSet:
    return ReferenceSet(
        images=torch.rand(n, 3, 4, 4),
        labels=torch.tensor([0, 1] * (n // 2)),
        class_names=["cat", "dog"],
        prompts=["p"] * n,
        metadata={"seeds": list(range(n))},
    )


def test_reference_set_validates_its_fields():
    images = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"`labels` must be in \[0, 1\]"):
        ReferenceSet(images, torch.tensor([0, 2]), ["cat", "dog"], ["a", "b"])
    with pytest.raises(ValueError, match=r"`labels` must have shape \(2,\)"):
        ReferenceSet(images, torch.tensor([0, 1, 1]), ["cat", "dog"], ["a", "b"])
    with pytest.raises(TypeError, match="integer class indices"):
        ReferenceSet(images, torch.tensor([0.0, 1.0]), ["cat", "dog"], ["a", "b"])
    with pytest.raises(ValueError, match=r"one string per image \(2\)"):
        ReferenceSet(images, torch.tensor([0, 1]), ["cat", "dog"], ["a"])
    with pytest.raises(ValueError, match=r"pixel values in \[0, 1\]"):
        ReferenceSet(images * 255, torch.tensor([0, 1]), ["cat", "dog"], ["a", "b"])
    with pytest.raises(ValueError, match="JSON-serializable"):
        ReferenceSet(images, torch.tensor([0, 1]), ["cat", "dog"], ["a", "b"], {"x": object()})
    with pytest.raises(ValueError, match="distinct names"):
        ReferenceSet(images, torch.tensor([0, 1]), ["cat", "cat"], ["a", "b"])


def test_reference_set_helpers():
    refs = reference_set()
    assert len(refs) == 4 and refs.num_classes == 2 and refs.class_counts() == {"cat": 2, "dog": 2}
    dogs = refs.subset(classes=["dog"])
    assert (
        dogs.labels.tolist() == [1, 1]
        and dogs.class_names == ["cat", "dog"]
        and dogs.metadata["seeds"] == [1, 3]
    )
    assert torch.equal(refs.subset([3, 0]).images, refs.images[[0, 3]])
    with pytest.raises(ValueError, match=r"unknown class\(es\) \['cow'\]"):
        refs.subset(classes=["cow"])
    with pytest.raises(ValueError, match="the subset is empty"):
        refs.subset([0], classes=["dog"])
    grey = refs.to_channels(1)
    expected = 0.299 * refs.images[:, 0] + 0.587 * refs.images[:, 1] + 0.114 * refs.images[:, 2]
    assert grey.image_shape == (1, 4, 4) and torch.allclose(grey.images[:, 0], expected)
    assert grey.to_channels(3).image_shape == (3, 4, 4)
    assert refs.resized(2).image_shape == (3, 2, 2)
    assert repr(refs) == "ReferenceSet(num_images=4, num_classes=2, image_shape=(3, 4, 4), generator=None)"
    with pytest.raises(AttributeError):
        refs.images = torch.zeros(1)  # frozen
