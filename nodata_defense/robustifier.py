"""``Robustifier``: validate the user's classifier and class names, then run the method's three steps.

    robust = Robustifier(model, class_names, sigma=0.25).fit()

``fit()`` is a short script over the step modules and holds no algorithm itself:
synthesis (``synthesis.synthesize``) → personalization of the denoiser (``personalize.personalize``)
→ classifier adaptation (``adapt.adapt_classifier``) → :class:`~nodata_defense.robust_model.RobustModel`.
Every choice has the paper's default and is overridable through one
:class:`~nodata_defense.config.RobustifierConfig`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._hub import bundled_path, ensure_reachable, hub_errors, library_versions, looks_like_repo_id
from ._validation import check_class_names, check_positive_float
from .classifiers import ImageClassifier, ZeroShotClassifier, as_image_classifier, check_num_classes
from .config import (
    BUNDLED_DENOISER_ID,
    BUNDLED_T2I_ID,
    PAPER_DENOISER,
    PAPER_GENERATOR,
    PAPER_UPSCALER,
    DenoiserSource,
    RobustifierConfig,
    RobustModelConfig,
)
from .denoiser import DiffusionDenoiser
from .robust_model import RobustModel, describe_classifier, describe_denoiser, has_denoiser_lora

# Images of this shape get the bundled digits text-to-image model and digits denoiser.
DIGITS_SHAPE = (1, 28, 28)
# The paper's working resolution (DeepFloyd IF stage II output, IF-II-L denoiser input).
PAPER_RESOLUTION = 256
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Robustifier:
    """Makes a pretrained classifier certifiably robust with no training data (Choi et al., ECCV 2024).

    Args:
        model: the classifier, an ``nn.Module`` mapping ``[0, 1]`` images ``(N, C, H, W)`` to
            logits: plain / torchvision / timm modules, transformers image classifiers, an
            :class:`~nodata_defense.classifiers.ImageClassifier` or a CLIP
            :class:`~nodata_defense.classifiers.ZeroShotClassifier`.
        class_names: one name per logit, in logit order; they become the prompts of synthesis.
        sigma: noise level of smoothing in ``[0, 1]`` pixel space (default ``config.sigma``, 0.25).
        generator: the text-to-image back-end of step 1 (an object of ``nodata_defense.synthesis``)
            or a Hub id / local path to load one from; default: see ``RobustifierConfig``.
        denoiser: the base :class:`~nodata_defense.denoiser.DiffusionDenoiser` (personalized in
            place by ``fit``) or a Hub id / local path; default: see ``RobustifierConfig``.
        preprocess: the classifier's preprocessing (resize, mean/std) when ``model`` does not
            normalize its inputs itself; an ``nn.Module``, a callable or a transformers processor.
        config: a :class:`~nodata_defense.config.RobustifierConfig` (or a dict of its fields).
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        *,
        sigma: float | None = None,
        generator: Any = None,
        denoiser: DiffusionDenoiser | str | os.PathLike | None = None,
        preprocess: Any = None,
        config: RobustifierConfig | Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"`model` must be a torch.nn.Module mapping [0, 1] images to logits; got {type(model).__name__}."
            )
        names = check_class_names("class_names", class_names)
        if len(names) < 2:
            raise ValueError(f"`class_names` must hold at least 2 classes; got {names}.")
        config = _as_config(config)
        if sigma is not None:
            sigma = check_positive_float("sigma", sigma)
            if "sigma" in config.model_fields_set and config.sigma != sigma:
                raise ValueError(
                    f"`sigma`={sigma:g} contradicts `config.sigma`={config.sigma:g}; set only one of them."
                )
            config.sigma = sigma
        self.config = config
        self.class_names = names
        self.classifier = as_image_classifier(model, preprocess=preprocess)
        self.image_shape = config.image_shape or _infer_image_shape(self.classifier, denoiser)
        check_num_classes(self.classifier, len(names), self.image_shape)
        self.generator = _check_generator(generator)
        self.denoiser = _check_denoiser(denoiser, config.sigma)

    @property
    def sigma(self) -> float:
        return self.config.sigma

    def __repr__(self) -> str:
        names = self.class_names
        shown = ", ".join(repr(c) for c in names[:4]) + (", ..." if len(names) > 4 else "")
        c = self.config
        return (
            f"Robustifier(sigma={c.sigma:g}, classes={len(names)} [{shown}], image_shape={self.image_shape},"
            f" classifier={type(self.classifier.model).__name__}, generator={_describe(self.generator, 'generator')},"
            f" denoiser={_describe(self.denoiser, 'denoiser')}, shots_per_class={c.synthesis.shots_per_class},"
            f" personalize_steps={c.personalize.steps}, lora_rank={c.personalize.lora_rank},"
            f" adapt_mode={c.adapt.mode!r}, adapt_epochs={c.adapt.epochs}, seed={c.seed}, device={c.device})"
        )

    # ----------------------------------------------------------------------------------------- fit
    def fit(
        self, *, work_dir: str | os.PathLike | None = None, show_progress: bool | None = None
    ) -> RobustModel:
        """Run synthesis → personalization → adaptation and return the :class:`RobustModel`.

        ``work_dir`` (default ``config.work_dir``) keeps the reference images and the training
        checkpoints, so an interrupted ``fit`` resumes where it stopped; ``None`` writes nothing to
        disk. ``show_progress`` (default ``config.show_progress``) shows tqdm bars.
        """
        from .adapt import adapt_classifier
        from .personalize import personalize
        from .synthesis import synthesize

        config = self.config.model_copy(deep=True)
        show = config.show_progress if show_progress is None else bool(show_progress)
        work = work_dir if work_dir is not None else config.work_dir
        directory = Path(work) if work is not None else None
        steps = _step_configs(config, show)
        device = _device(config, self.classifier)
        classifier = self.classifier.to(device)

        generator = self._generator(device)
        references = synthesize(
            self.class_names,
            generator,
            steps["synthesis"],
            cache_dir=directory / "references" if directory else None,
        )
        del generator  # a generator loaded here is freed before the denoiser loads
        references = _match_shape(references, self.image_shape)

        denoiser, source = self._denoiser(device)
        personalize(
            denoiser,
            classifier,
            references,
            steps["personalize"],
            checkpoint_dir=directory / "personalize" if directory else None,
        )
        adaptation = adapt_classifier(
            classifier,
            denoiser,
            references,
            config.sigma,
            steps["adapt"],
            checkpoint_dir=directory / "adapt" if directory else None,
        )
        info = RobustModelConfig(
            sigma=config.sigma,
            class_names=self.class_names,
            image_shape=self.image_shape,
            base_denoiser=source,
            base_classifier=describe_classifier(classifier, len(self.class_names)),
            personalized=True,
            adaptation_mode=adaptation.mode,
            adaptation_head_module=adaptation.head_module,
            versions=library_versions(),
            fit_config=config,
        )
        return RobustModel(
            adaptation.classifier,
            denoiser,
            sigma=config.sigma,
            class_names=self.class_names,
            image_shape=self.image_shape,
            info=info,
        )

    # ------------------------------------------------------------------------------- model loading
    def default_models(self) -> tuple[str, str]:
        """(generator id, denoiser id) used when neither an object nor a config id is given."""
        if tuple(self.image_shape) == DIGITS_SHAPE:
            return BUNDLED_T2I_ID, BUNDLED_DENOISER_ID
        return PAPER_GENERATOR, PAPER_DENOISER

    def _generator(self, device: torch.device) -> Any:
        source = self.generator if self.generator is not None else self.config.generator
        if source is None:
            source = self.default_models()[0]
        if not isinstance(source, (str, os.PathLike)):
            return source
        return load_generator(source, device=device)

    def _denoiser(self, device: torch.device) -> tuple[DiffusionDenoiser, DenoiserSource]:
        config = self.config
        if isinstance(self.denoiser, DiffusionDenoiser):
            if has_denoiser_lora(self.denoiser):
                raise ValueError(
                    "the `denoiser` object of this Robustifier was personalized in place by an earlier fit();"
                    " pass a fresh base denoiser (or its id) to fit again."
                )
            denoiser = self.denoiser.to(device)
            return denoiser, describe_denoiser(denoiser)
        source = self.denoiser if self.denoiser is not None else config.denoiser
        if source is None:
            source = self.default_models()[1]
        source = os.fspath(source)
        path = bundled_path(source)
        if path is None:
            ensure_reachable(source, "load the denoiser", revision=config.denoiser_revision)
        path = path or source
        with hub_errors(source, "load the denoiser"):
            # The prompt's embedding is cached and the text encoder dropped (IF's T5-XXL: 4.7 B
            # parameters): the denoiser only ever uses that one prompt.
            denoiser = DiffusionDenoiser.from_pretrained(
                path,
                subfolder=config.denoiser_subfolder,
                revision=config.denoiser_revision,
                torch_dtype=_DTYPES[config.denoiser_dtype],
                prompt=config.denoiser_prompt,
                keep_text_encoder=False,
            )
        denoiser.timestep_for_sigma(config.sigma)
        denoiser = denoiser.to(device)
        recorded = describe_denoiser(
            denoiser, source, revision=config.denoiser_revision, subfolder=config.denoiser_subfolder
        )
        return denoiser, recorded


# ----------------------------------------------------------------------------------- validation
def _as_config(config: Any) -> RobustifierConfig:
    if config is None:
        return RobustifierConfig()
    if isinstance(config, RobustifierConfig):
        return config.model_copy(deep=True)
    if isinstance(config, Mapping):
        return RobustifierConfig.model_validate(dict(config))
    raise TypeError(
        f"`config` must be a RobustifierConfig, a dict of its fields or None; got {type(config).__name__}."
    )


def _check_generator(generator: Any) -> Any:
    if generator is None or isinstance(generator, (str, os.PathLike)):
        return generator
    if not callable(getattr(generator, "generate", None)) or not isinstance(
        getattr(generator, "id", None), str
    ):
        hint = (
            " Wrap a function in nodata_defense.synthesis.CallableGenerator(fn)."
            if callable(generator)
            else ""
        )
        raise TypeError(
            "`generator` must be a text-to-image back-end (an object with .generate and .id, e.g. from"
            f" nodata_defense.synthesis), a Hub id or a local path; got {type(generator).__name__}.{hint}"
        )
    return generator


def _check_denoiser(denoiser: Any, sigma: float) -> Any:
    if denoiser is None or isinstance(denoiser, (str, os.PathLike)):
        return denoiser
    if not isinstance(denoiser, DiffusionDenoiser):
        raise TypeError(
            f"`denoiser` must be a DiffusionDenoiser, a Hub id or a local path; got {type(denoiser).__name__}."
        )
    if has_denoiser_lora(denoiser):
        raise ValueError(
            "`denoiser` already holds a personalization LoRA (was it fitted before?); pass a fresh base denoiser."
        )
    denoiser.timestep_for_sigma(sigma)  # refuses a σ beyond the denoiser's schedule
    return denoiser


def _infer_image_shape(classifier: ImageClassifier, denoiser: Any) -> tuple[int, int, int]:
    """(C, H, W) the classifier expects: its declared input size, else the paper's resolution."""
    from .zoo import DigitCNN

    model = classifier.model
    config = getattr(model, "config", None)
    if isinstance(classifier, ZeroShotClassifier):
        size = getattr(getattr(config, "vision_config", None), "image_size", None)
        if isinstance(size, int):
            return (3, size, size)
    if isinstance(model, DigitCNN):
        return DIGITS_SHAPE
    size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", None)
    if isinstance(size, int) and isinstance(channels, int):
        return (channels, size, size)
    if isinstance(denoiser, DiffusionDenoiser) and denoiser.sample_size is not None:
        return (denoiser.image_channels, *denoiser.sample_size)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else 3
    return (channels if isinstance(channels, int) else 3, PAPER_RESOLUTION, PAPER_RESOLUTION)


def _describe(obj: Any, what: str) -> str:
    if obj is None:
        return "default"
    if isinstance(obj, (str, os.PathLike)):
        return repr(os.fspath(obj))
    return f"{type(obj).__name__}({getattr(obj, 'id', '')!r})" if what == "generator" else type(obj).__name__


# ------------------------------------------------------------------------------------ fit helpers
def _step_configs(config: RobustifierConfig, show: bool) -> dict[str, Any]:
    """The three steps' configs with the top-level seed and progress setting applied."""
    out = {}
    for name in ("synthesis", "personalize", "adapt"):
        step = getattr(config, name)
        update: dict[str, Any] = {"show_progress": show or step.show_progress}
        if config.seed is not None:
            update["seed"] = config.seed
        out[name] = step.model_copy(update=update, deep=True)
    return out


def _device(config: RobustifierConfig, classifier: nn.Module) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    for tensor in (*classifier.parameters(), *classifier.buffers()):
        return tensor.device
    return torch.device("cpu")


def _match_shape(references: Any, image_shape: Sequence[int]) -> Any:
    """References converted to the classifier's channels and size (what it will see in use)."""
    channels, height, width = image_shape
    if references.image_shape[0] != channels:
        references = references.to_channels(channels)
    if tuple(references.image_shape[1:]) != (height, width):
        references = references.resized((height, width))
    return references


def load_generator(source: str | os.PathLike, *, device: torch.device | str | None = None) -> Any:
    """A synthesis back-end from a bundled id, a local directory or a Hub id.

    A directory with ``model_index.json`` is a diffusers pipeline (``IFPipeline``: the paper's
    two-stage IF; anything else: :class:`DiffusersText2ImageGenerator`); a directory with
    ``unet/`` + ``text_encoder/`` and no pipeline index is a :class:`PixelDiffusionGenerator`
    (the bundled digits model's layout). A Hub id ``DeepFloyd/IF-I-*`` loads the paper's IF; other
    Hub ids load as diffusers pipelines.
    """
    from .synthesis import DeepFloydIFGenerator, DiffusersText2ImageGenerator, PixelDiffusionGenerator

    text = os.fspath(source)
    device = torch.device(device) if device is not None else torch.device("cpu")
    on_gpu = device.type == "cuda"
    path = bundled_path(text)
    if path is not None:
        return PixelDiffusionGenerator.from_pretrained(path, id=text, device=device)
    if os.path.isdir(text):
        index = Path(text) / "model_index.json"
        if not index.is_file():
            return PixelDiffusionGenerator.from_pretrained(text, device=device)
        import json

        pipeline_class = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
        if pipeline_class == "IFPipeline":
            return DeepFloydIFGenerator.from_pretrained(text, PAPER_UPSCALER, device=device)
        return DiffusersText2ImageGenerator.from_pretrained(text, device=device)
    if not looks_like_repo_id(text):
        raise FileNotFoundError(
            f"`generator` {text!r} is neither a local directory nor a Hub id ('org/name')."
        )
    half = {"torch_dtype": torch.float16, "variant": "fp16"} if on_gpu else {}
    ensure_reachable(text, "load the generator")
    with hub_errors(text, "load the generator"):
        if text.startswith("DeepFloyd/IF-I"):
            # 16 GB GPUs: each IF stage moves to the GPU only while it runs.
            return DeepFloydIFGenerator.from_pretrained(
                text, PAPER_UPSCALER, device=device if on_gpu else None, cpu_offload=on_gpu, **half
            )
        return DiffusersText2ImageGenerator.from_pretrained(text, device=device, **half)


__all__ = ["Robustifier", "load_generator"]
