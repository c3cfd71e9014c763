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
    guidance_scale: float | None = Field(
        None, ge=0.0, description="None: the paper's rule, 7.0 for one shot per class and 4.0 for more."
    )
    num_inference_steps: int = Field(100, ge=1, description="Sampling steps (IF: of stage I; paper: 100).")
    image_size: int | None = Field(
        None,
        ge=1,
        description="Resize outputs to this side (shorter side + centre crop); None keeps the model's.",
    )
    batch_size: int = Field(4, ge=1, description="Images per generator call; memory only where seeds allow.")
    free_stage_one: bool = Field(
        False, description="IF only: run stage I for every image, free it (and T5), then run stage II."
    )
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
    """Classifier-guided LoRA fine-tuning of the diffusion denoiser (step 2).

    Defaults follow the paper's reference run (IF-II-L, 500 steps, 4 processes x batch 6 = 24, AdamW
    lr 1e-4 with cosine decay, weight decay 1e-2 (the DreamBooth-LoRA script default it keeps),
    gradient clipping at 1.0, LoRA rank 4 on the attention projections, lambda = 0.01).
    """

    lora_rank: int = Field(4, ge=1, description="LoRA rank r.")
    lora_alpha: float | None = Field(None, gt=0, description="None: equal to the rank (scale 1).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        description="UNet module names (or name suffixes) that get LoRA; default: attention projections.",
    )
    classifier_weight: float = Field(
        0.01, ge=0.0, description="lambda of MSE(eps) + lambda * CE(f(x0_hat), y); 0 skips the classifier."
    )
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; None disables it.")
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

    @field_validator("timestep_range")
    @classmethod
    def _ordered_timesteps(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 0 <= value[0] <= value[1]:
            raise ValueError(f"`timestep_range` must be (low, high) with 0 <= low <= high; got {value}")
        return value


# --------------------------------------------------------------------- classifier adaptation (step 3)
class AdaptConfig(_Config):
    """Adaptation of the classifier to the denoiser's outputs on synthetic images (step 3).

    Defaults follow the paper's reference run for CLIP ViT-B/32: full fine-tuning, AdamW lr 5e-7
    with cosine decay, no weight decay, no gradient clipping, 10 epochs, batch 256 (capped at the
    number of reference images).
    """

    mode: Literal["full", "lora", "head", "none"] = "full"
    learning_rate: float = Field(5e-7, gt=0, description="Paper: 5e-7 for full fine-tuning of CLIP ViT-B/32.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(None, gt=0, description="Gradient clipping; None disables it.")
    epochs: int = Field(10, ge=1, description="Passes over the references: steps = epochs * ceil(N / batch).")
    batch_size: int = Field(256, ge=1, description="Capped at the number of reference images.")
    denoise_batch_size: int = Field(
        32, ge=1, description="Chunk size of the (no-grad) denoiser calls; memory only, no effect on results."
    )
    sigma_range: tuple[float, float] | None = Field(
        None, description="Draw the noise level uniformly from this range; None: the sigma of use."
    )
    train_mode: bool = Field(
        False,
        description="Run the classifier in train() mode (BatchNorm statistics update, dropout on); default"
        " eval(): a few synthetic images would make BatchNorm running statistics drift.",
    )
    head_module: str | None = Field(
        None, description="mode='head': name of the layer to train; None: the last nn.Linear found."
    )
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float | None = Field(None, gt=0, description="None: equal to the rank (scale 1).")
    lora_target_modules: list[str] | None = Field(
        None, description="None: every nn.Linear and (non-grouped) nn.Conv2d layer."
    )
    warmup_steps: int = Field(0, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    seed: int = 0
    show_progress: bool = False

    @field_validator("sigma_range")
    @classmethod
    def _ordered_sigmas(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 < value[0] <= value[1]:
            raise ValueError(f"`sigma_range` must be (low, high) with 0 < low <= high; got {value}")
        return value


# ------------------------------------------------------------------------- the whole fit (Robustifier)
# The paper's models (Choi et al. 2024): DeepFloyd IF stage I + II synthesize the references and
# the IF-II-L super-resolution UNet is the one-shot denoiser. Gated, non-commercial weights.
PAPER_GENERATOR = "DeepFloyd/IF-I-XL-v1.0"
PAPER_UPSCALER = "DeepFloyd/IF-II-L-v1.0"
PAPER_DENOISER = "DeepFloyd/IF-II-L-v1.0"
# The bundled offline demo models (nodata_defense.zoo), addressed by these ids in saved models.
BUNDLED_CLASSIFIER_ID = "nodata-defense/digits-cnn"
BUNDLED_T2I_ID = "nodata-defense/digits-t2i"
BUNDLED_DENOISER_ID = "nodata-defense/digits-denoiser"


class RobustifierConfig(_Config):
    """Everything ``Robustifier.fit()`` does, in one validated object (paper defaults).

    ``generator`` / ``denoiser`` name the models used when ``Robustifier`` gets no model object:
    ``None`` means the paper's DeepFloyd IF models, or for ``1×28×28`` images the bundled digits
    text-to-image model and digits denoiser. ``work_dir`` holds the reference cache and the training checkpoints (a re-run resumes);
    ``None`` uses a temporary directory removed after ``fit``.
    """

    sigma: float = Field(0.25, gt=0, description="Noise level of smoothing, measured in [0, 1] pixel space.")
    seed: int | None = Field(None, description="If set, replaces the seed of each of the three steps.")
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    personalize: PersonalizeConfig = Field(default_factory=PersonalizeConfig)
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)
    generator: str | None = Field(None, description="Text-to-image model id or path; None: see above.")
    denoiser: str | None = Field(None, description="Pixel diffusion model id or path; None: see above.")
    denoiser_subfolder: str | None = "unet"
    denoiser_revision: str | None = None
    denoiser_prompt: str = Field("", description="Class-agnostic prompt of a text-conditioned denoiser.")
    denoiser_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Weights dtype of the base denoiser loaded by id (LoRA trains in float32)."
    )
    image_shape: tuple[int, int, int] | None = Field(
        None, description="(C, H, W) of the images to classify; None: read from the classifier if it can."
    )
    device: str | None = Field(None, description="None: the classifier's device.")
    work_dir: str | None = None
    show_progress: bool = False

    @field_validator("image_shape")
    @classmethod
    def _positive_shape(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and min(value) < 1:
            raise ValueError(f"`image_shape` must be (C, H, W) of positive integers; got {value}")
        return value


# ------------------------------------------------------------------ the saved model (config.json)
class PreprocessSpec(_Config):
    """The settings of an :class:`~nodata_defense.classifiers.ImagePreprocess`, to rebuild it."""

    size: int | tuple[int, int] | None = None
    mode: str = "resize"
    crop_size: tuple[int, int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: str = "bilinear"
    antialias: bool = True
    grayscale_to_rgb: bool = False


class DenoiserSource(_Config):
    """Where the base (un-personalized) denoiser of a saved model loads from."""

    id: str | None = Field(
        None, description="Hub id, local path or bundled id; None: unknown, pass `denoiser=` when loading."
    )
    revision: str | None = None
    subfolder: str | None = "unet"
    kind: str
    prompt: str = ""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class ClassifierSource(_Config):
    """How the base classifier of a saved model is rebuilt (``kind="user"``: it is passed again)."""

    kind: Literal["bundled", "transformers", "clip_zero_shot", "user"]
    id: str | None = None
    revision: str | None = None
    model_class: str
    num_classes: int = Field(ge=2)
    preprocess: PreprocessSpec | None = None
    templates: list[str] | None = Field(None, description="clip_zero_shot: the prompt templates.")


class CertifiedAccuracy(_Config):
    """Certified accuracy at radii ``radii`` (fractions in [0, 1]) measured on ``num_images`` images."""

    radii: list[float] = Field(min_length=1)
    accuracy: list[float] = Field(min_length=1)
    sigma: float = Field(gt=0)
    n0: int = Field(ge=1)
    n: int = Field(ge=1)
    alpha: float = Field(gt=0, lt=1)
    num_images: int = Field(ge=1)
    dataset: str | None = None

    @field_validator("accuracy")
    @classmethod
    def _fractions(cls, value: list[float], info) -> list[float]:
        radii = info.data.get("radii")
        if radii is not None and len(radii) != len(value):
            raise ValueError(f"`accuracy` must have one entry per radius ({len(radii)}); got {len(value)}")
        if any(not 0.0 <= a <= 1.0 for a in value):
            raise ValueError(f"`accuracy` values must be fractions in [0, 1]; got {value}")
        return value


class RobustModelConfig(_Config):
    """Contents of a saved ``RobustModel``'s ``config.json``."""

    format_version: int = FORMAT_VERSION
    library_name: Literal["nodata-defense"] = "nodata-defense"
    sigma: float = Field(gt=0)
    class_names: list[str] = Field(min_length=2)
    image_shape: tuple[int, int, int]
    base_denoiser: DenoiserSource
    base_classifier: ClassifierSource
    personalized: bool = Field(description="True: denoiser_lora/ holds the personalization LoRA.")
    adaptation_mode: Literal["full", "lora", "head", "none"]
    adaptation_head_module: str | None = Field(None, description="mode 'head': the trained layer.")
    versions: dict[str, str] = Field(default_factory=dict)
    certified_accuracy: CertifiedAccuracy | None = None
    fit_config: RobustifierConfig | None = Field(None, description="The configuration `fit()` ran with.")

    @field_validator("format_version")
    @classmethod
    def _known_format(cls, value: int) -> int:
        if value > FORMAT_VERSION:
            raise ValueError(
                f"format_version {value} was written by a newer nodata-defense (this one reads up to"
                f" {FORMAT_VERSION}); upgrade with `pip install -U nodata-defense`"
            )
        return value

    @field_validator("class_names")
    @classmethod
    def _distinct_names(cls, value: list[str]) -> list[str]:
        if any(not name.strip() for name in value) or len(set(value)) != len(value):
            raise ValueError(f"`class_names` must be distinct non-empty strings; got {value}")
        return value
