"""Quickstart: the four calls of nodata-defense, on CPU in well under a minute.

    robust = Robustifier(model, class_names, sigma=0.25).fit()
    robust.predict(x); robust.certify(x, sigma=0.25); robust.push_to_hub("org/name")

The models here are tiny and random (a 3-class CNN and a 16x16 text-to-image diffusion model built
on the spot), so the numbers mean nothing: the point is the workflow. With real models (DeepFloyd
IF, CLIP, a ResNet, ...) the same calls run on a GPU; see docs/real_models.md.

    python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from nodata_defense import ABSTAIN, Robustifier, RobustifierConfig, RobustModel

CLASS_NAMES = ["circle", "square", "triangle"]


def tiny_classifier() -> nn.Module:
    """Stands for your pretrained classifier: [0, 1] images (N, 3, 16, 16) -> 3 logits."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)
    )


def tiny_text_to_image(directory: Path) -> Path:
    """Stands for a pixel-space text-to-image diffusion model (diffusers layout), used both to
    synthesize reference images and as the one-shot denoiser. Random weights."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "this", "is", "a", "photo", "of", *CLASS_NAMES]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=8,
    )
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(words),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    unet.save_pretrained(directory / "unet")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(directory / "scheduler")
    text_encoder.save_pretrained(directory / "text_encoder")
    tokenizer.save_pretrained(directory / "tokenizer")
    return directory


def main() -> None:
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t2i = tiny_text_to_image(tmp / "t2i")
        model = tiny_classifier()

        # 1. Fit. The paper's defaults (DeepFloyd IF, 500 LoRA steps, ...) are overridden here only
        #    to keep the run tiny; every setting lives in one validated RobustifierConfig.
        config = RobustifierConfig(
            synthesis={"shots_per_class": 2, "num_inference_steps": 4},
            personalize={"steps": 5, "batch_size": 4},
            adapt={"epochs": 2, "batch_size": 6, "learning_rate": 1e-4},
            image_shape=(3, 16, 16),
            seed=0,
        )
        robustifier = Robustifier(
            model, CLASS_NAMES, sigma=0.25, generator=str(t2i), denoiser=str(t2i), config=config
        )
        print(robustifier)
        robust = robustifier.fit()
        print(robust)

        # 2. Predict and 3. certify: float images (N, C, H, W) in [0, 1].
        x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        for p in robust.predict(x, n=100, generator=0):
            print(
                "predict:", "abstain" if p.label == ABSTAIN else CLASS_NAMES[p.label], f"(p={p.p_value:.2g})"
            )
        for c in robust.certify(x, sigma=0.25, n0=20, n=200, generator=0):
            label = "abstain" if c.label == ABSTAIN else CLASS_NAMES[c.label]
            print(f"certify: {label:<9} radius={c.radius:.3f}  pA_lower={c.pa_lower:.3f}")

        # 4. Share. push_to_hub("org/name") needs a Hub account and network; save_pretrained writes
        #    the same files locally: config.json, README.md, denoiser_lora/, classifier_adapter/.
        # robust.push_to_hub("your-org/robust-shapes")
        robust.save_pretrained(tmp / "robust-shapes")
        print("saved:", sorted(p.relative_to(tmp).as_posix() for p in (tmp / "robust-shapes").rglob("*.*")))
        # This classifier is a plain nn.Module, so it is passed again when loading.
        reloaded = RobustModel.from_pretrained(tmp / "robust-shapes", classifier=tiny_classifier())
        same = [c.label for c in reloaded.certify(x, n0=20, n=200, generator=0)]
        print("reloaded model certifies the same labels:", same)


if __name__ == "__main__":
    main()
