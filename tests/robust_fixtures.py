"""Fixtures shared by the Robustifier / RobustModel / Hub / CLI tests.

A tiny text-to-image pixel diffusion model (1-channel 16×16 ``UNet2DConditionModel`` + a 1-layer
CLIP text encoder + a word-level tokenizer built locally, from ``tiny_models``) saved in the
diffusers layout serves as both generator and denoiser; ``tiny_models.TinyCNN`` is the classifier.
Everything is random, nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
from tiny_models import clip_text_encoder, cosine_schedule, save_t2i, tiny_text_unet, word_tokenizer
from torch import nn
from transformers import CLIPTextModel, PreTrainedTokenizerFast

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@contextmanager
def benchmark_module(name: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` imported as a module, with its folder on ``sys.path`` meanwhile
    (the benchmarks import their siblings, such as ``_report``)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


CLASS_NAMES = ["zero", "one", "two"]
WORDS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "this", "is", "a", "photo", "of", *CLASS_NAMES]
MAX_LENGTH = 8
# Command-line options that run every stage of the digits demo (and of benchmarks/quality.py) at
# the smallest sizes that still exercise it.
TINY_DEMO_OPTIONS = [
    "--n0", "10",
    "--n", "20",
    "--shots", "1",
    "--synthesis-steps", "2",
    "--steps", "2",
    "--personalize-batch-size", "4",
    "--adapt-epochs", "1",
    "--full-data-per-class", "1",
    "--quiet",
]  # fmt: skip


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(WORDS, MAX_LENGTH)


def tiny_text_encoder() -> CLIPTextModel:
    return clip_text_encoder(len(WORDS), MAX_LENGTH)


def save_tiny_t2i(directory: Path, channels: int = 1, size: int = 16) -> Path:
    """A tiny text-to-image pixel diffusion model in the diffusers layout (unet/, scheduler/,
    text_encoder/, tokenizer/), loadable by ``DiffusionDenoiser.from_pretrained``."""
    return save_t2i(
        directory, tiny_text_unet(channels, size), cosine_schedule(), tiny_text_encoder(), tiny_tokenizer()
    )


def without_time(results) -> list[dict]:
    """Certification results without their (run-dependent) timings."""
    return [{k: v for k, v in dataclasses.asdict(r).items() if k != "seconds"} for r in results]


def images(n: int = 2, channels: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def references(n: int = 6, channels: int = 1, size: int = 16, num_classes: int = 3, seed: int = 0):
    """A stand-in ReferenceSet: ``images`` in [0, 1] and cyclic ``labels``."""
    from types import SimpleNamespace

    return SimpleNamespace(images=images(n, channels, size, seed), labels=torch.arange(n) % num_classes)


def assemble(
    t2i_dir: Path, classifier: nn.Module, mode: str = "full", *, sigma: float = 0.25, channels: int = 1
):
    """A small fitted RobustModel built from the step functions directly (no synthesis)."""
    from nodata_defense.adapt import adapt_classifier
    from nodata_defense.classifiers import as_image_classifier
    from nodata_defense.config import AdaptConfig, PersonalizeConfig
    from nodata_defense.denoiser import DiffusionDenoiser
    from nodata_defense.robust_model import RobustModel, describe_denoiser

    denoiser = DiffusionDenoiser.from_pretrained(t2i_dir)
    base = as_image_classifier(classifier)
    refs = references(channels=channels)
    from nodata_defense.personalize import personalize

    personalize(denoiser, base, refs, PersonalizeConfig(steps=2, batch_size=4))
    adapted = adapt_classifier(
        base, denoiser, refs, sigma, AdaptConfig(mode=mode, epochs=1, batch_size=4, learning_rate=1e-2)
    )
    model = RobustModel(adapted.classifier, denoiser, sigma=sigma, class_names=CLASS_NAMES)
    info = model.config.model_copy(
        update={
            "adaptation_mode": mode,
            "adaptation_head_module": adapted.head_module,
            "base_denoiser": describe_denoiser(denoiser, str(t2i_dir)),
        }
    )
    return RobustModel(adapted.classifier, denoiser, sigma=sigma, class_names=CLASS_NAMES, info=info)
