"""Typed, validated configuration of every step; the paper's defaults live here and only here.

Paper: Choi, Jeong, Jang & Shin, "Adversarial Robustification via Text-to-Image Diffusion Models",
ECCV 2024 (arXiv 2407.18658). Each step module takes its config and nothing else global.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Version of the on-disk format written by `RobustModel.save_pretrained` (config.json).
FORMAT_VERSION = 1


class _Config(BaseModel):
    """Base: unknown keys are errors, assignments are validated, configs are JSON round-trippable."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# ----------------------------------------------------------------------------- synthesis (step 1)
class SynthesisConfig(_Config):
    """Reference-image synthesis from class names (step 1)."""

    templates: list[str] = Field(default_factory=lambda: ["This is a photo of a {}"])
    class_prompts: dict[str, str] = Field(
        default_factory=dict, description="Per-class text that replaces the class name in the templates."
    )
    shots_per_class: int = Field(1, ge=1)
    seed: int = 0
    guidance_scale: float = Field(7.0, ge=0.0, description="Paper: 7.0 for one shot, 4.0 for more.")
    num_inference_steps: int = Field(100, ge=1)
    image_size: int | None = Field(None, ge=1, description="Output side in pixels; None keeps the model's.")
    batch_size: int = Field(4, ge=1)
    free_stage_one: bool = Field(False, description="IF only: free stage I before running stage II.")
    show_progress: bool = False

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str]) -> list[str]:
        if not templates:
            raise ValueError("`templates` must hold at least one template")
        for t in templates:
            if t.count("{}") != 1:
                raise ValueError(
                    f"each template must contain exactly one '{{}}' slot for the class name; got {t!r}"
                )
        return templates


# ------------------------------------------------------------------------ personalization (step 2)
class PersonalizeConfig(_Config):
    """Classifier-guided LoRA fine-tuning of the diffusion denoiser (step 2)."""

    lora_rank: int = Field(4, ge=1)
    lora_alpha: float | None = Field(None, gt=0, description="None: equal to the rank (scale 1).")
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    classifier_weight: float = Field(
        0.01, ge=0.0, description="lambda of MSE(eps) + lambda * CE(f(x0_hat), y)."
    )
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    steps: int = Field(500, ge=1)
    batch_size: int = Field(24, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    timestep_range: tuple[int, int] | None = Field(
        None, description="Inclusive range of training timesteps; None: the whole schedule."
    )
    warmup_steps: int = Field(0, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    seed: int = 0
    show_progress: bool = False


# --------------------------------------------------------------------- classifier adaptation (step 3)
class AdaptConfig(_Config):
    """Adaptation of the classifier to the denoiser's outputs on synthetic images (step 3)."""

    mode: Literal["full", "lora", "head", "none"] = "full"
    learning_rate: float = Field(5e-7, gt=0, description="Paper: 5e-7 for full fine-tuning of CLIP ViT-B/32.")
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    sigma_range: tuple[float, float] | None = Field(
        None, description="Draw the noise level uniformly from this range; None: the sigma of use."
    )
    lora_rank: int = Field(4, ge=1)
    lora_target_modules: list[str] | None = Field(
        None, description="None: every nn.Linear / attention layer."
    )
    checkpoint_every: int = Field(100, ge=1)
    seed: int = 0
    show_progress: bool = False
