"""Tiny seeded models shared by the Robustifier / RobustModel / Hub tests.

A tiny text-to-image pixel diffusion model (1-channel 16×16 ``UNet2DConditionModel`` + a 1-layer
CLIP text encoder + a word-level tokenizer built locally) saved in the diffusers layout serves as
both generator and denoiser; a tiny CNN is the classifier. Everything is random, nothing is
downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

CLASS_NAMES = ["zero", "one", "two"]
WORDS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "this", "is", "a", "photo", "of", *CLASS_NAMES]
TEXT_WIDTH = 16
MAX_LENGTH = 8


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=MAX_LENGTH,
    )


def tiny_text_encoder() -> CLIPTextModel:
    torch.manual_seed(1)
    config = CLIPTextConfig(
        vocab_size=len(WORDS),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return CLIPTextModel(config).eval()


def tiny_text_unet(channels: int = 1, size: int = 16) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def save_tiny_t2i(directory: Path, channels: int = 1, size: int = 16) -> Path:
    """A tiny text-to-image pixel diffusion model in the diffusers layout (unet/, scheduler/,
    text_encoder/, tokenizer/), loadable by ``DiffusionDenoiser.from_pretrained``."""
    directory = Path(directory)
    tiny_text_unet(channels, size).save_pretrained(directory / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(
        directory / "scheduler"
    )
    tiny_text_encoder().save_pretrained(directory / "text_encoder")
    tiny_tokenizer().save_pretrained(directory / "tokenizer")
    return directory


class TinyCNN(nn.Module):
    """A small classifier of ``channels``-channel images into ``num_classes`` classes."""

    def __init__(self, channels: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.body = nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


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
