"""``RobustModel``: the fitted product — a certifiably robust classifier with Hub save/load/push.

``RobustModel = smoothing(classifier' ∘ denoiser', σ)``: Gaussian noise of std σ on ``[0, 1]``
images, a one-shot diffusion denoiser personalized with LoRA, then the (adapted) classifier.
``predict``/``certify`` are Cohen et al.'s Monte Carlo procedures (``nodata_defense.smoothing``);
``forward`` is one noise draw, differentiable, for attacks and training.

A saved model holds what the fit changed and what it needs to rebuild the rest, nothing else::

    config.json                                    RobustModelConfig (pydantic, format_version)
    README.md                                      model card with Hub metadata
    denoiser_lora/adapter_config.json              peft LoRA of the denoiser's UNet
    denoiser_lora/adapter_model.safetensors
    classifier_adapter/...                         as written by adapt.save_classifier_adapter
                                                   (absent for adaptation mode "none")

The base denoiser and classifier are loaded again by their recorded ids (Hub id, local path or
bundled id); a classifier that cannot be rebuilt that way is passed again with ``classifier=``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin
from torch import Tensor, nn

from ._hub import (
    HubUnreachableError,
    bundled_path,
    ensure_reachable,
    hub_answers,
    hub_errors,
    library_versions,
    looks_like_repo_id,
)
from ._io import atomic_write_json
from ._validation import _short, check_class_names, check_images, check_positive_float
from .classifiers import (
    ImageClassifier,
    ImagePreprocess,
    ZeroShotClassifier,
    as_image_classifier,
    check_num_classes,
)
from .config import (
    BUNDLED_CLASSIFIER_ID,
    BUNDLED_DENOISER_ID,
    BUNDLED_T2I_ID,
    FORMAT_VERSION,
    CertifiedAccuracy,
    ClassifierSource,
    DenoiserSource,
    PreprocessSpec,
    RobustModelConfig,
)
from .denoiser import DenoisedClassifier, DiffusionDenoiser
from .smoothing import Certificate, Prediction, SmoothedClassifier

CONFIG_FILE = "config.json"
MODEL_CARD_FILE = "README.md"
DENOISER_LORA_DIR = "denoiser_lora"
CLASSIFIER_ADAPTER_DIR = "classifier_adapter"
# What from_pretrained downloads from a Hub repo (a repo may hold other files, e.g. .gitattributes).
_SAVED_PATTERNS = [CONFIG_FILE, MODEL_CARD_FILE, f"{DENOISER_LORA_DIR}/*", f"{CLASSIFIER_ADAPTER_DIR}/*"]
_CARD_TAGS = [
    "adversarial-robustness",
    "certified-robustness",
    "randomized-smoothing",
    "denoised-smoothing",
    "diffusion",
    "lora",
    "nodata-defense",
]
_PAPER_URL = "https://arxiv.org/abs/2407.18658"
# Keys the ModelHubMixin copies from config.json into the loader's keyword arguments because
# RobustModel.__init__ has parameters of the same names.
_CONFIG_INIT_KEYS = ("sigma", "class_names", "image_shape")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RobustModel(
    nn.Module,
    ModelHubMixin,
    library_name="nodata-defense",
    tags=list(_CARD_TAGS),
    pipeline_tag="image-classification",
    paper_url=_PAPER_URL,
):
    """A certifiably robust classifier: ``smoothing(classifier ∘ denoiser, σ)``.

    Usually returned by ``Robustifier(...).fit()`` or ``RobustModel.from_pretrained(...)``; it can
    also be assembled directly, e.g. ``RobustModel(classifier, DiffusionDenoiser.from_pretrained(...),
    sigma=0.25, class_names=names)`` for plain denoised smoothing without personalization.

    Args:
        classifier: ``[0, 1]`` images → logits; any ``nn.Module`` accepted by
            :func:`~nodata_defense.classifiers.as_image_classifier` (or an ``ImageClassifier``).
        denoiser: the (personalized) :class:`~nodata_defense.denoiser.DiffusionDenoiser`.
        sigma: noise level of smoothing in ``[0, 1]`` pixel space.
        class_names: one name per logit, in logit order.
        image_shape: ``(C, H, W)`` of the images; default: the denoiser's channels and sample size.
        info: the saved description (sources of the base models, adaptation mode, ...); built
            from the arguments when omitted.
    """

    def __init__(
        self,
        classifier: nn.Module,
        denoiser: DiffusionDenoiser,
        *,
        sigma: float,
        class_names: Sequence[str],
        image_shape: Sequence[int] | None = None,
        info: RobustModelConfig | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(denoiser, DiffusionDenoiser):
            raise TypeError(f"`denoiser` must be a DiffusionDenoiser; got {type(denoiser).__name__}.")
        self.classifier = as_image_classifier(classifier)
        self.denoiser = denoiser
        sigma = check_positive_float("sigma", sigma)
        denoiser.timestep_for_sigma(sigma)  # refuses a σ beyond the denoiser's schedule
        names = check_class_names("class_names", class_names)
        if len(names) < 2:
            raise ValueError(f"`class_names` must hold at least 2 classes; got {names}.")
        shape = _image_shape(image_shape, denoiser)
        # One forward pass the first time only: the classifier remembers the count it observed.
        check_num_classes(self.classifier, len(names), shape)
        if info is None:
            info = RobustModelConfig(
                sigma=sigma,
                class_names=names,
                image_shape=shape,
                base_denoiser=describe_denoiser(denoiser),
                base_classifier=describe_classifier(self.classifier, len(names)),
                personalized=has_denoiser_lora(denoiser),
                adaptation_mode="none",
                versions=library_versions(),
            )
        elif not isinstance(info, RobustModelConfig):
            raise TypeError(f"`info` must be a RobustModelConfig or None; got {type(info).__name__}.")
        else:
            info = info.model_copy(
                update={"sigma": sigma, "class_names": names, "image_shape": shape}, deep=True
            )
            info = RobustModelConfig.model_validate(info.model_dump())
        if info.personalized and not has_denoiser_lora(denoiser):
            raise ValueError("`info.personalized` is True but the denoiser holds no personalization LoRA.")
        self._info = info
        self.eval()

    # ------------------------------------------------------------------------------- properties
    @property
    def sigma(self) -> float:
        return self._info.sigma

    @property
    def class_names(self) -> list[str]:
        return list(self._info.class_names)

    @property
    def num_classes(self) -> int:
        return len(self._info.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self._info.image_shape)

    @property
    def adaptation_mode(self) -> str:
        return self._info.adaptation_mode

    @property
    def config(self) -> RobustModelConfig:
        """A copy of what ``save_pretrained`` writes to ``config.json``."""
        return self._info.model_copy(deep=True)

    @property
    def certified_accuracy(self) -> CertifiedAccuracy | None:
        """Certified-accuracy table shown on the model card; set it after an evaluation."""
        return self._info.certified_accuracy

    @certified_accuracy.setter
    def certified_accuracy(self, table: CertifiedAccuracy | Mapping[str, Any] | None) -> None:
        if table is not None and not isinstance(table, CertifiedAccuracy):
            if not isinstance(table, Mapping):
                raise TypeError(
                    f"`certified_accuracy` must be a CertifiedAccuracy, a dict of its fields or None; got"
                    f" {type(table).__name__}."
                )
            table = CertifiedAccuracy.model_validate(dict(table))
        if table is not None and not math.isclose(table.sigma, self.sigma):
            raise ValueError(
                f"`certified_accuracy` was measured at sigma={table.sigma:g} but this model smooths at"
                f" sigma={self.sigma:g}; the card must describe the model's own sigma."
            )
        self._info = self._info.model_copy(update={"certified_accuracy": table})

    # -------------------------------------------------------------------------------- inference
    def _check_input(self, x: Any) -> Tensor:
        if isinstance(x, Tensor) and x.requires_grad:
            # Checked detached (reading values off a graph warns); the clamp keeps the graph.
            check_images(x.detach(), "x")
            x = x.clamp(0.0, 1.0)
        else:
            x = check_images(x, "x")
        channels = self.image_shape[0]
        if x.shape[1] != channels:
            raise ValueError(
                f"`x` must have {channels} channel(s), like the images this model was fitted for (image_shape="
                f"{self.image_shape}); got shape {tuple(x.shape)}."
            )
        return x

    def base_classifier(self, sigma: float | None = None) -> DenoisedClassifier:
        """The base classifier of smoothing at ``sigma`` (default: the fitted σ): noisy images → logits."""
        sigma = self.sigma if sigma is None else check_positive_float("sigma", sigma)
        return DenoisedClassifier(self.denoiser, self.classifier, sigma)

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Logits for one noise draw: ``classifier(denoiser(x + σ·N(0, I)))``; differentiable in ``x``."""
        x = self._check_input(x)
        device, dtype = self.denoiser.device, self.denoiser.dtype
        x = x.to(device=device, dtype=dtype)
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=dtype)
        return self.base_classifier()(x + self.sigma * noise)

    def predict(
        self,
        x: Tensor,
        *,
        n: int = 1_000,
        alpha: float = 0.001,
        batch_size: int = 256,
        generator: torch.Generator | int | None = None,
        show_progress: bool = False,
    ) -> list[Prediction]:
        """The smoothed classifier's label for each image, or ``ABSTAIN`` (Cohen et al.'s PREDICT).

        With probability at least ``1 - alpha`` per image, a returned label is the smoothed
        classifier's. ``generator``: a ``torch.Generator`` on the denoiser's device or an int seed.
        """
        x = self._check_input(x)
        smoothed = SmoothedClassifier(self.base_classifier(), self.num_classes, self.sigma)
        return smoothed.predict(
            x, n=n, alpha=alpha, batch_size=batch_size, generator=generator, show_progress=show_progress
        )

    def certify(
        self,
        x: Tensor,
        *,
        sigma: float | None = None,
        n0: int = 100,
        n: int = 10_000,
        alpha: float = 0.001,
        batch_size: int = 256,
        generator: torch.Generator | int | None = None,
        show_progress: bool = False,
    ) -> list[Certificate]:
        """Certify each image: its smoothed label and an ℓ2 radius, or ``ABSTAIN`` (Cohen et al.'s CERTIFY).

        ``sigma`` defaults to the fitted one; another σ is allowed (the certificate stays valid) but
        warns, because the denoiser was personalized and the classifier adapted for the fitted σ.
        """
        if sigma is None:
            sigma = self.sigma
        else:
            sigma = check_positive_float("sigma", sigma)
            if not math.isclose(sigma, self.sigma):
                warnings.warn(
                    f"certifying at sigma={sigma:g}, but this model was personalized and adapted for"
                    f" sigma={self.sigma:g}; expect lower certified accuracy than at the fitted sigma.",
                    UserWarning,
                    stacklevel=2,
                )
        x = self._check_input(x)
        smoothed = SmoothedClassifier(self.base_classifier(sigma), self.num_classes, sigma)
        return smoothed.certify(
            x,
            n0=n0,
            n=n,
            alpha=alpha,
            batch_size=batch_size,
            generator=generator,
            show_progress=show_progress,
        )

    def __repr__(self) -> str:
        info = self._info
        names = info.class_names
        shown = ", ".join(repr(c) for c in names[:4]) + (", ..." if len(names) > 4 else "")
        source = info.base_denoiser
        denoiser = f"{source.id!r}" if source.id else "<unrecorded>"
        return (
            f"RobustModel(sigma={info.sigma:g}, classes={len(names)} [{shown}], image_shape={self.image_shape},"
            f" denoiser={denoiser} (kind={source.kind}, personalized={info.personalized}),"
            f" classifier={info.base_classifier.model_class} ({info.base_classifier.kind}),"
            f" adaptation={info.adaptation_mode!r})"
        )

    # ------------------------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        config: Any = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Save to ``save_directory``: config.json, README.md, denoiser_lora/, classifier_adapter/.

        Everything is written into a temporary sibling directory that replaces ``save_directory``
        only once complete, so an interrupted save leaves the previous content untouched. An
        existing ``save_directory`` must be empty or hold a previously saved ``RobustModel``.
        """
        if config is not None:
            raise TypeError(
                "`config` is not accepted: a RobustModel writes its own config.json (see `.config`)."
            )
        target = Path(save_directory)
        _check_replaceable(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".saving", dir=target.parent))
        try:
            super().save_pretrained(staging, model_card_kwargs=model_card_kwargs)
            _replace_directory(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if push_to_hub:
            return self.push_to_hub(
                repo_id or target.name, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs
            )
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        from .adapt import save_classifier_adapter
        from .personalize import save_denoiser_adapter

        save_directory = Path(save_directory)
        if self._info.personalized:
            save_denoiser_adapter(self.denoiser, save_directory / DENOISER_LORA_DIR)
        mode = self._info.adaptation_mode
        if mode != "none":
            save_classifier_adapter(
                self.classifier,
                save_directory / CLASSIFIER_ADAPTER_DIR,
                mode,
                head_module=self._info.adaptation_head_module,
            )
        # Written last: a folder with a config.json is complete.
        atomic_write_json(save_directory / CONFIG_FILE, self._info.model_dump(mode="json"))

    def generate_model_card(self, *args: Any, repo_id: str | None = None, **kwargs: Any) -> ModelCard:
        """The model card (README.md): Hub metadata, what the model is, how to load it, results."""
        return ModelCard(_model_card_text(self._info, repo_id))

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:  # type: ignore[override]
        """Upload the saved files to the Hub repo ``repo_id`` (created if needed) in one commit.

        Keyword options are those of ``huggingface_hub.ModelHubMixin.push_to_hub`` (``token``,
        ``private``, ``branch``, ``create_pr``, ``commit_message``, ...).
        """
        card_kwargs = {"repo_id": repo_id, **(kwargs.pop("model_card_kwargs", None) or {})}
        with hub_errors(repo_id, "push the robust model to"):
            return super().push_to_hub(repo_id, model_card_kwargs=card_kwargs, **kwargs)

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        **model_kwargs: Any,
    ) -> RobustModel:
        """Load a saved model from a local directory or a Hub repo id.

        ``model_kwargs``: ``classifier=`` (the base classifier, required when it cannot be rebuilt
        from its recorded id), ``denoiser=`` (a loaded base ``DiffusionDenoiser``, e.g. to skip a
        download; it receives the LoRA in place), ``device=`` and ``torch_dtype=`` (of the base
        denoiser loaded by id).
        """
        source = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(source) and not looks_like_repo_id(source):
            raise FileNotFoundError(
                f"no such directory {source!r}, and it is not a Hub repo id ('org/name')."
            )
        if not os.path.isdir(source) and not local_files_only:
            # One quick request first: huggingface_hub retries a refused download for ~20 s.
            local_files_only = _probe_hub(source, revision=revision, token=token, cache_dir=cache_dir)
        with hub_errors(source, "download the robust model"):
            return super().from_pretrained(
                source,
                force_download=force_download,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                revision=revision,
                **model_kwargs,
            )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        classifier: nn.Module | None = None,
        denoiser: DiffusionDenoiser | None = None,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        **from_config: Any,
    ) -> RobustModel:
        from .adapt import load_classifier_adapter
        from .personalize import load_denoiser_adapter

        unknown = sorted(set(from_config) - set(_CONFIG_INIT_KEYS))
        if unknown:
            raise TypeError(
                f"RobustModel.from_pretrained got unexpected keyword argument(s) {unknown}; it takes"
                " classifier=, denoiser=, device=, torch_dtype= and the Hub options (revision=, token=,"
                " cache_dir=, force_download=, local_files_only=)."
            )
        folder = _saved_folder(
            model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
        info = read_saved_config(folder)
        for key, value in from_config.items():
            saved = json.loads(json.dumps(getattr(info, key)))
            if json.loads(json.dumps(value)) != saved:
                raise ValueError(
                    f"`{key}` is fixed by the saved model ({_short(saved)}); got {_short(value)}."
                    + (" Certify at another sigma with certify(x, sigma=...)." if key == "sigma" else "")
                )
        _check_saved_files(folder, info)

        if denoiser is None:
            denoiser = _load_base_denoiser(info.base_denoiser, torch_dtype)
        else:
            _check_given_denoiser(denoiser, info.base_denoiser)
        if info.personalized:
            load_denoiser_adapter(denoiser, folder / DENOISER_LORA_DIR)

        base = _base_classifier(info, classifier, model_id)
        check_num_classes(base, len(info.class_names), info.image_shape)
        adapted = base
        if info.adaptation_mode != "none":
            adapted = load_classifier_adapter(base, folder / CLASSIFIER_ADAPTER_DIR)
        model = cls(
            adapted,
            denoiser,
            sigma=info.sigma,
            class_names=info.class_names,
            image_shape=info.image_shape,
            info=info,
        )
        if device is not None:
            model.to(device)
        return model


# ---------------------------------------------------------------------------------- descriptions
def has_denoiser_lora(denoiser: DiffusionDenoiser) -> bool:
    """Whether the denoiser's UNet holds the personalization LoRA (peft adapter)."""
    from .personalize import ADAPTER_NAME

    return ADAPTER_NAME in (getattr(denoiser.unet, "peft_config", None) or {})


def _image_shape(image_shape: Sequence[int] | None, denoiser: DiffusionDenoiser) -> tuple[int, int, int]:
    if image_shape is None:
        if denoiser.sample_size is None:
            raise ValueError(
                "`image_shape` is required: the denoiser's UNet does not record a sample size to default to."
            )
        return (denoiser.image_channels, *denoiser.sample_size)
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(
        isinstance(s, Integral) and not isinstance(s, bool) and s >= 1 for s in shape
    ):
        raise ValueError(f"`image_shape` must be (C, H, W) of positive integers; got {_short(image_shape)}.")
    return tuple(int(s) for s in shape)


def describe_denoiser(
    denoiser: DiffusionDenoiser,
    source: str | None = None,
    *,
    revision: str | None = None,
    subfolder: str | None = "unet",
) -> DenoiserSource:
    """Where ``denoiser`` loads from: ``source`` if given, else the path diffusers recorded in its UNet."""
    if source is None:
        recorded = getattr(denoiser.unet.config, "_name_or_path", None)
        source = recorded if isinstance(recorded, str) and recorded else None
    if source is not None and os.path.exists(source):
        from .zoo.models import DIGIT_T2I_DIR, WEIGHTS_DIR

        bundled = {DIGIT_T2I_DIR: BUNDLED_T2I_ID, WEIGHTS_DIR / "digits-denoiser": BUNDLED_DENOISER_ID}
        source = next((i for d, i in bundled.items() if Path(source).resolve() == d.resolve()), source)
    dtype = {v: k for k, v in _DTYPES.items()}.get(denoiser.dtype, "float32")
    return DenoiserSource(
        id=source,
        revision=revision,
        subfolder=subfolder,
        kind=denoiser.kind,
        prompt=denoiser.prompt if denoiser.is_text_conditioned else "",
        dtype=dtype,
    )


def preprocess_spec(preprocess: Any) -> PreprocessSpec | None:
    """The settings of an ImagePreprocess (``None`` for no preprocessing)."""
    if preprocess is None:
        return None
    if not isinstance(preprocess, ImagePreprocess):
        raise TypeError(f"only an ImagePreprocess can be described; got {type(preprocess).__name__}.")
    return PreprocessSpec(
        size=preprocess.size,
        mode=preprocess.mode,
        crop_size=preprocess.crop_size,
        mean=None if preprocess.mean is None else list(preprocess.mean),
        std=None if preprocess.std is None else list(preprocess.std),
        interpolation=preprocess.interpolation,
        antialias=preprocess.antialias,
        grayscale_to_rgb=preprocess.grayscale_to_rgb,
    )


def build_preprocess(spec: PreprocessSpec | None) -> ImagePreprocess | None:
    if spec is None:
        return None
    return ImagePreprocess(
        spec.size,
        mode=spec.mode,
        crop_size=spec.crop_size,
        mean=spec.mean,
        std=spec.std,
        interpolation=spec.interpolation,
        antialias=spec.antialias,
        grayscale_to_rgb=spec.grayscale_to_rgb,
    )


def _is_bundled_digit_cnn(model: nn.Module) -> bool:
    from .zoo import DigitCNN, load_digit_classifier

    if not isinstance(model, DigitCNN):
        return False
    try:
        reference = load_digit_classifier().state_dict()
    except FileNotFoundError:
        return False
    state = model.state_dict()
    return set(state) == set(reference) and all(
        torch.equal(state[k].detach().cpu().to(reference[k].dtype), reference[k]) for k in reference
    )


def describe_classifier(classifier: ImageClassifier, num_classes: int) -> ClassifierSource:
    """How the base classifier can be rebuilt at load time (``kind="user"``: it must be passed again)."""
    model = classifier.model
    model_class = type(model).__name__
    preprocess = classifier.preprocess
    rebuildable = preprocess is None or isinstance(preprocess, ImagePreprocess)
    spec = preprocess_spec(preprocess) if rebuildable else None
    name = getattr(getattr(model, "config", None), "name_or_path", None)
    revision = getattr(getattr(model, "config", None), "_commit_hash", None)
    common = {"model_class": model_class, "num_classes": num_classes, "preprocess": spec}
    if rebuildable and isinstance(name, str) and name:
        if isinstance(classifier, ZeroShotClassifier):
            return ClassifierSource(
                kind="clip_zero_shot",
                id=name,
                revision=revision,
                templates=list(classifier.templates),
                **common,
            )
        if type(classifier) is ImageClassifier and _is_transformers_model(model):
            return ClassifierSource(kind="transformers", id=name, revision=revision, **common)
    if type(classifier) is ImageClassifier and preprocess is None and _is_bundled_digit_cnn(model):
        return ClassifierSource(kind="bundled", id=BUNDLED_CLASSIFIER_ID, **common)
    return ClassifierSource(kind="user", **common)


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


# ------------------------------------------------------------------------------- loading helpers
def _saved_folder(model_id: str, **hub_options: Any) -> Path:
    if os.path.isdir(model_id):
        return Path(model_id)
    from huggingface_hub import snapshot_download

    with hub_errors(model_id, "download the robust model"):
        return Path(snapshot_download(repo_id=model_id, allow_patterns=_SAVED_PATTERNS, **hub_options))


def _probe_hub(repo_id: str, *, revision: str | None, token: Any, cache_dir: Any) -> bool:
    """Check the Hub answers; return True to continue offline (from the cache) when it does not.

    Raises :class:`HubUnreachableError` when the Hub cannot be reached and the cache does not hold
    the repo. Other answers (missing repo, no access) are left to the download to report.
    """
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        return True
    error = hub_answers(repo_id, revision=revision, token=token)
    if error is None:
        return False
    try:
        snapshot_download(
            repo_id=repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=True,
            allow_patterns=_SAVED_PATTERNS,
        )
    except Exception:
        raise HubUnreachableError(repo_id, "download the robust model", error) from error
    return True


def read_saved_config(folder: str | os.PathLike) -> RobustModelConfig:
    """Read and validate ``config.json`` of a saved ``RobustModel``."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a saved RobustModel: it has no {CONFIG_FILE}.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(raw, dict) or raw.get("library_name") != "nodata-defense":
        raise ValueError(f"{str(path)!r} is not the config of a nodata-defense RobustModel.")
    version = raw.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has format_version {version}, written by a newer nodata-defense (this one reads up to"
            f" {FORMAT_VERSION}); upgrade with `pip install -U nodata-defense`."
        )
    return RobustModelConfig.model_validate(raw)


def load_saved_config(
    model_id_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
) -> RobustModelConfig:
    """The ``config.json`` of a saved model (local directory or Hub repo), without loading any weights."""
    source = os.fspath(model_id_or_path)
    if os.path.isdir(source):
        return read_saved_config(source)
    if not looks_like_repo_id(source):
        raise FileNotFoundError(f"no such directory {source!r}, and it is not a Hub repo id ('org/name').")
    from huggingface_hub import hf_hub_download

    offline = _probe_hub(source, revision=revision, token=token, cache_dir=cache_dir)
    with hub_errors(source, "read the config of"):
        path = hf_hub_download(
            source, CONFIG_FILE, revision=revision, token=token, cache_dir=cache_dir, local_files_only=offline
        )
    return read_saved_config(Path(path).parent)


def _check_saved_files(folder: Path, info: RobustModelConfig) -> None:
    from .adapt import CLASSIFIER_ADAPTER_JSON
    from .personalize import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

    needed = []
    if info.personalized:
        needed += [
            f"{DENOISER_LORA_DIR}/{ADAPTER_CONFIG_FILE}",
            f"{DENOISER_LORA_DIR}/{ADAPTER_WEIGHTS_FILE}",
        ]
    if info.adaptation_mode != "none":
        needed.append(f"{CLASSIFIER_ADAPTER_DIR}/{CLASSIFIER_ADAPTER_JSON}")
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"the saved RobustModel in {str(folder)!r} is incomplete: missing {missing}.")


def _load_base_denoiser(source: DenoiserSource, torch_dtype: torch.dtype | None) -> DiffusionDenoiser:
    if source.id is None:
        raise ValueError(
            "the saved model does not record where its base denoiser comes from; pass it with"
            " RobustModel.from_pretrained(..., denoiser=DiffusionDenoiser.from_pretrained(...))."
        )
    path = bundled_path(source.id) or source.id
    dtype = torch_dtype if torch_dtype is not None else _DTYPES[source.dtype]
    text = source.kind in ("text", "if_superres")
    if bundled_path(source.id) is None:
        ensure_reachable(source.id, "load the base denoiser", revision=source.revision)
    with hub_errors(source.id, "load the base denoiser"):
        return DiffusionDenoiser.from_pretrained(
            path,
            subfolder=source.subfolder,
            revision=source.revision,
            torch_dtype=dtype,
            prompt=source.prompt if text else "",
            kind=source.kind,
            keep_text_encoder=False,  # only the recorded prompt is ever used: its embedding is cached
        )


def _check_given_denoiser(denoiser: Any, source: DenoiserSource) -> None:
    if not isinstance(denoiser, DiffusionDenoiser):
        raise TypeError(f"`denoiser` must be a DiffusionDenoiser; got {type(denoiser).__name__}.")
    if denoiser.kind != source.kind:
        raise ValueError(
            f"`denoiser` is of kind {denoiser.kind!r} but the saved model was fitted on a {source.kind!r} denoiser"
            f" ({source.id!r})."
        )
    if has_denoiser_lora(denoiser):
        raise ValueError(
            "`denoiser` already holds a personalization LoRA; pass the base (un-personalized) denoiser."
        )
    if denoiser.is_text_conditioned and denoiser.prompt != source.prompt:
        denoiser.prompt = source.prompt  # the prompt the LoRA was trained with


def _base_classifier(info: RobustModelConfig, given: nn.Module | None, model_id: str) -> ImageClassifier:
    source = info.base_classifier
    preprocess = build_preprocess(source.preprocess)
    if given is not None:
        if isinstance(given, ImageClassifier):
            return given
        if not isinstance(given, nn.Module):
            raise TypeError(f"`classifier` must be a torch.nn.Module; got {type(given).__name__}.")
        return as_image_classifier(given, preprocess=preprocess, num_classes=source.num_classes)
    if source.kind == "bundled":
        from .zoo import load_digit_classifier

        return as_image_classifier(load_digit_classifier(), num_classes=source.num_classes)
    if source.kind == "transformers":
        from transformers import AutoModelForImageClassification

        ensure_reachable(source.id, "load the classifier", revision=source.revision)
        with hub_errors(source.id, "load the classifier"):
            model = AutoModelForImageClassification.from_pretrained(
                source.id, revision=source.revision, use_safetensors=True
            )
        return ImageClassifier(model.eval(), preprocess=preprocess, num_classes=source.num_classes)
    if source.kind == "clip_zero_shot":
        from transformers import AutoModel, AutoTokenizer

        ensure_reachable(source.id, "load the classifier", revision=source.revision)
        with hub_errors(source.id, "load the classifier"):
            model = AutoModel.from_pretrained(source.id, revision=source.revision, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(source.id, revision=source.revision)
        return ZeroShotClassifier.from_clip(
            model.eval(),
            tokenizer,
            info.class_names,
            templates=source.templates or ("a photo of a {}.",),
            image_preprocess=preprocess,
        )
    raise ValueError(
        f"the saved model's classifier ({source.model_class}) cannot be rebuilt from the saved files: pass it"
        f" again with RobustModel.from_pretrained({model_id!r}, classifier=model)."
    )


# ------------------------------------------------------------------------------ saving helpers
def _is_saved_model(directory: Path) -> bool:
    try:
        raw = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("library_name") == "nodata-defense"


def _check_replaceable(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"`save_directory` {str(target)!r} exists and is not a directory.")
    if target.is_dir() and any(target.iterdir()) and not _is_saved_model(target):
        raise ValueError(
            f"`save_directory` {str(target)!r} is not empty and does not hold a saved RobustModel; refusing to"
            " replace its contents. Choose a new or empty directory."
        )


def _replace_directory(staging: Path, target: Path) -> None:
    """Move the complete ``staging`` directory to ``target`` (replacing a previous save)."""
    if target.is_dir() and any(target.iterdir()):
        # The old save is set aside before the new one moves in, and deleted only afterwards.
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    if target.is_dir():
        target.rmdir()
    os.replace(staging, target)


# ----------------------------------------------------------------------------------- model card
def _fmt_pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _model_card_text(info: RobustModelConfig, repo_id: str | None) -> str:
    denoiser, classifier = info.base_denoiser, info.base_classifier
    data = ModelCardData(
        library_name="nodata-defense",
        tags=sorted(set(_CARD_TAGS)),
        pipeline_tag="image-classification",
        base_model=denoiser.id if denoiser.id and looks_like_repo_id(denoiser.id) else None,
    )
    names = info.class_names
    shown = ", ".join(names[:20]) + (f", … ({len(names)} in all)" if len(names) > 20 else "")
    load_id = repo_id or "<repo id or directory>"
    load_args = f'"{load_id}"' + (", classifier=model" if classifier.kind == "user" else "")
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# Certifiably robust {classifier.model_class} (σ = {info.sigma:g})",
        "",
        "An image classifier made certifiably robust to ℓ2 adversarial perturbations without its training"
        " data, with [nodata-defense](https://pypi.org/project/nodata-defense/): randomized smoothing"
        " (Cohen et al., 2019) over a one-shot diffusion denoiser (Carlini et al., 2023) personalized with"
        f" LoRA on synthetic images of the class names ([Choi et al., ECCV 2024]({_PAPER_URL})).",
        "",
        "| | |",
        "|---|---|",
        f"| noise level σ (pixels in [0, 1]) | {info.sigma:g} |",
        f"| image shape (C, H, W) | {tuple(info.image_shape)} |",
        f"| classes | {shown} |",
        f"| base denoiser | {denoiser.id or 'not recorded'}"
        + (f" @ {denoiser.revision}" if denoiser.revision else "")
        + f" ({denoiser.kind}{', LoRA-personalized' if info.personalized else ''}) |",
        f"| classifier | {classifier.model_class} ({classifier.kind}"
        + (f": {classifier.id}" if classifier.id else "")
        + ") |",
        f"| classifier adaptation | {info.adaptation_mode} |",
        "",
        "## Usage",
        "",
        "```python",
        "from nodata_defense import RobustModel",
        "",
        f"robust = RobustModel.from_pretrained({load_args})",
        "certificates = robust.certify(images)  # float (N, C, H, W) in [0, 1]",
        "labels = [c.label for c in certificates]  # -1 = abstain; c.radius = certified l2 radius",
        "```",
        "",
    ]
    if classifier.kind == "user":
        lines += [
            f"The base classifier ({classifier.model_class}) is not stored here: pass the same model as"
            " `classifier=` when loading.",
            "",
        ]
    lines += ["## Certified accuracy", ""]
    table = info.certified_accuracy
    if table is None:
        lines += ["Not measured for this upload.", ""]
    else:
        lines += [
            f"Certified accuracy (%) on {table.num_images} images"
            + (f" of {table.dataset}" if table.dataset else "")
            + f", σ = {table.sigma:g}, N = {table.n}, N0 = {table.n0}, α = {table.alpha:g}:",
            "",
            "| radius | " + " | ".join(f"{r:g}" for r in table.radii) + " |",
            "|---|" + "---|" * len(table.radii),
            "| certified accuracy | " + " | ".join(_fmt_pct(a) for a in table.accuracy) + " |",
            "",
        ]
    lines += [
        "## Files",
        "",
        "- `config.json`: settings and the sources of the base models (nodata-defense format"
        f" {info.format_version});",
        "- `denoiser_lora/`: the denoiser's personalization LoRA (peft format, safetensors);"
        if info.personalized
        else "- no denoiser LoRA (the base denoiser is used as is);",
        f"- `classifier_adapter/`: the classifier adaptation ({info.adaptation_mode}, safetensors)."
        if info.adaptation_mode != "none"
        else "- no classifier adaptation (the base classifier is used as is).",
        "",
    ]
    return "\n".join(lines)


__all__ = ["CONFIG_FILE", "HubUnreachableError", "RobustModel", "load_saved_config", "read_saved_config"]
