"""Tiny random-weight models built from config, shared by the tests (nothing is downloaded).

Every builder seeds torch itself, so a call gives the same weights whatever ran before it. Word lists
stay with the test files: a vocabulary fixes the token ids, hence what a text encoder returns.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

# The transformer body of the tiny ViT classifiers and of CLIP's vision tower.
VIT_BODY = {
    "image_size": 16,
    "patch_size": 8,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}
# The transformer body of the tiny CLIP text towers.
CLIP_TEXT_BODY = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}


# ------------------------------------------------------------------------------------ schedulers
def cosine_schedule() -> DDPMScheduler:
    """IF's 1000-step cosine schedule."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


# ----------------------------------------------------------------------------------------- UNets
def tiny_unet(channels: int = 3, size: int = 16, *, attention: bool = True, **kwargs) -> UNet2DModel:
    """An unconditional pixel UNet (DDPM's layout); ``attention=False`` leaves out every attention layer."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=kwargs.pop("out_channels", channels),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D"),
        up_block_types=("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D"),
        add_attention=attention,
        attention_head_dim=8,
        **kwargs,
    ).eval()


def tiny_text_unet(channels: int = 1, size: int = 16, width: int = 16) -> UNet2DConditionModel:
    """A text-conditioned pixel UNet, cross-attending to ``width``-wide prompt embeddings."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def tiny_if_unet(
    t5_width: int = 12, size: int = 16, *, in_channels: int = 6, class_embed_type: str | None = "timestep"
) -> UNet2DConditionModel:
    """DeepFloyd IF's UNet layout at toy size: learned variance (6 outputs), T5 projection, and (stage
    II, the default) 6 input channels with the noise-level class embedding."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=size,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        in_channels=in_channels,
        out_channels=6,
        cross_attention_dim=32,  # group-normed cross attention needs a multiple of 32
        encoder_hid_dim=t5_width,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        class_embed_type=class_embed_type,
        mid_block_scale_factor=1.414,
        time_embedding_act_fn="gelu",
        time_embedding_dim=16,
        norm_num_groups=4,
    ).eval()


# ------------------------------------------------------------------------------ text components
def word_tokenizer(
    words: list[str], max_length: int | None = 8, *, lowercase: bool = False, bos: bool = True
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words``, which start with [PAD], [UNK], [BOS], [EOS]."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "[BOS]", "eos_token": "[EOS]"}
    if not bos:
        del special["bos_token"]
    if max_length is not None:
        special["model_max_length"] = max_length
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def clip_text_encoder(vocab_size: int, max_length: int = 8, **ids: int) -> CLIPTextModel:
    """A one-layer CLIP text encoder, 16 wide; token ids default to those of :func:`word_tokenizer`."""
    torch.manual_seed(1)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        **CLIP_TEXT_BODY,
        max_position_embeddings=max_length,
        **({"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3} | ids),
    )
    return CLIPTextModel(config).eval()


def t5_encoder(vocab_size: int, width: int = 12) -> T5EncoderModel:
    """A one-layer T5 encoder (IF's text encoder at toy size)."""
    torch.manual_seed(2)
    config = T5Config(vocab_size=vocab_size, d_model=width, d_kv=6, d_ff=2 * width, num_layers=1, num_heads=2)
    return T5EncoderModel(config).eval()


def save_t2i(
    directory: Path, unet: nn.Module, scheduler, text_encoder: nn.Module | None = None, tokenizer=None
) -> Path:
    """Save the parts in the diffusers layout (unet/, scheduler/, text_encoder/, tokenizer/)."""
    directory = Path(directory)
    unet.save_pretrained(directory / "unet")
    scheduler.save_pretrained(directory / "scheduler")
    if text_encoder is not None:
        text_encoder.save_pretrained(directory / "text_encoder")
        tokenizer.save_pretrained(directory / "tokenizer")
    return directory


# ---------------------------------------------------------------------------------- classifiers
class TinyCNN(nn.Module):
    """A small classifier of ``channels``-channel images into ``num_classes`` classes: convolution,
    BatchNorm, ReLU, global mean, linear head (``head``)."""

    def __init__(self, channels: int = 1, num_classes: int = 3, *, width: int = 6, seed: int = 2) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))
