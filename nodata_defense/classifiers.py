"""Any classifier a user holds, as one kind of module: ``[0, 1]`` images (N, C, H, W) → logits (N, K).

The rest of the library only ever calls :func:`as_image_classifier` and then treats the result as
``f(x) -> logits``; everything model-specific (resizing, mean/std normalization, transformers
output objects, CLIP zero-shot heads) is absorbed here. Preprocessing is written with torch ops so
that it stays differentiable: the denoiser is fine-tuned through the classifier (personalization)
and attacks need gradients with respect to the ``[0, 1]`` pixels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from numbers import Integral
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import _short, check_class_names, check_positive_int

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ImageClassifier",
    "ImagePreprocess",
    "ZeroShotClassifier",
    "as_image_classifier",
    "check_num_classes",
    "extract_logits",
]

# OpenAI CLIP's normalization (the values every CLIP image processor on the Hub ships).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MODES = ("resize", "resize_shortest", "resize_shortest_then_center_crop")
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "nearest-exact")
# PIL resampling codes as stored in transformers image-processor configs (PIL.Image.Resampling).
# LANCZOS has no torch equivalent: antialiased bicubic is the closest.
_PIL_RESAMPLE = {0: "nearest-exact", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}


# ------------------------------------------------------------------------------------- helpers
def _pair(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, Integral) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, Integral) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise ValueError(
            f"`{name}` must be an integer >= 1 or a pair (height, width) of them; got {_short(value)}."
        )
    return int(value[0]), int(value[1])


def _channel_stats(name: str, value: Any, *, positive: bool) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,)
    try:
        stats = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a sequence of numbers, one per channel; got {_short(value)}."
        ) from None
    if not stats or (positive and any(not v > 0 for v in stats)):
        kind = "positive numbers" if positive else "numbers"
        raise ValueError(
            f"`{name}` must be a non-empty sequence of {kind}, one per channel; got {_short(value)}."
        )
    return stats


def _size_field(size: Any, key: str) -> Any:
    """Read one key of a processor's ``size``: a dict (transformers 4) or a ``SizeDict`` (5)."""
    if isinstance(size, Mapping):
        return size.get(key)
    return getattr(size, key, None)


def _interpolation_from_resample(resample: Any) -> str:
    if resample is None:
        return "bilinear"
    # torchvision's InterpolationMode (fast processors) carries its torch name as the value.
    value = getattr(resample, "value", resample)
    if isinstance(value, str) and value in _INTERPOLATIONS:
        return value
    if isinstance(value, Integral) and int(value) in _PIL_RESAMPLE:
        return _PIL_RESAMPLE[int(value)]
    name = str(getattr(resample, "name", resample)).lower()
    for candidate in ("bicubic", "bilinear", "nearest"):
        if candidate in name:
            return "nearest-exact" if candidate == "nearest" else candidate
    return "bilinear"


def _model_device_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for tensor in module.parameters():
        return tensor.device, tensor.dtype if tensor.is_floating_point() else None
    for tensor in module.buffers():
        return tensor.device, tensor.dtype if tensor.is_floating_point() else None
    return None, None


def _check_batch(x: Any, name: str = "x") -> Tensor:
    # No range check here: smoothing feeds noisy samples x + δ that leave [0, 1] on purpose.
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of images (N, C, H, W); got {type(x).__name__}.")
    if x.dim() != 4:
        raise ValueError(f"`{name}` must have 4 dimensions (N, C, H, W); got shape {tuple(x.shape)}.")
    if not torch.is_floating_point(x):
        raise TypeError(
            f"`{name}` must be a floating-point tensor with values in [0, 1]; got dtype {x.dtype}."
        )
    return x


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every submodule gets its own previous mode back afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _is_hf_image_processor(obj: Any) -> bool:
    try:
        from transformers import ProcessorMixin
        from transformers.image_processing_base import ImageProcessingMixin
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(obj, (ImageProcessingMixin, ProcessorMixin))


def _is_hf_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _is_contrastive_model(model: Any) -> bool:
    return all(hasattr(model, a) for a in ("get_image_features", "get_text_features", "logit_scale"))


def extract_logits(output: Any, batch_size: int | None = None) -> Tensor:
    """The logits tensor (B, K) out of whatever a classifier returned.

    Accepts a tensor, a transformers ``ModelOutput`` / dict with ``logits``, or a tuple/list whose
    first element is the logits (e.g. torchvision Inception's training outputs).
    """
    logits = output
    if not isinstance(logits, Tensor):
        if getattr(output, "logits", None) is not None:
            logits = output.logits
        elif isinstance(output, Mapping):
            if output.get("logits") is None:
                raise TypeError(
                    f"`model` returned a {type(output).__name__} without `logits` (keys: {list(output.keys())});"
                    " expected a model with a classification head, e.g. AutoModelForImageClassification."
                )
            logits = output["logits"]
        elif isinstance(output, (tuple, list)) and output:
            logits = output[0]
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"`model` must return logits as a tensor (or an output with `.logits`); got {type(output).__name__}."
        )
    if logits.dim() != 2 or (batch_size is not None and logits.shape[0] != batch_size):
        raise ValueError(
            f"`model` must return logits of shape (batch, num_classes) = ({batch_size}, K); got shape"
            f" {tuple(logits.shape)}. Is it a model with a classification head (not a feature extractor)?"
        )
    return logits


# -------------------------------------------------------------------------------- preprocessing
class ImagePreprocess(nn.Module):
    """Differentiable resize + per-channel normalization of ``[0, 1]`` images.

    Args:
        size: target of the resize, or ``None`` for no resize. ``mode="resize"``: an int or
            ``(height, width)``, the exact output size. ``mode="resize_shortest"`` /
            ``"resize_shortest_then_center_crop"``: an int, the length of the shorter side
            (aspect ratio kept, longer side ``int(size * long / short)`` as transformers does).
        mode: ``"resize"``, ``"resize_shortest"`` or ``"resize_shortest_then_center_crop"``
            (what CLIP / many ViT processors do).
        crop_size: center crop applied after the resize (int or ``(height, width)``); for
            ``"resize_shortest_then_center_crop"`` it defaults to ``(size, size)``. Images smaller than
            the crop are zero-padded first, like transformers' ``center_crop``.
        mean, std: per-channel normalization ``(x - mean) / std``; ``None`` for none.
        interpolation: ``"bilinear"``, ``"bicubic"``, ``"nearest"`` or ``"nearest-exact"``.
        antialias: antialiased (PIL-like) down-sampling for bilinear/bicubic, on CPU and CUDA
            (other devices fall back to plain interpolation).
        grayscale_to_rgb: repeat single-channel images to three channels (an RGB model fed
            grayscale images).
    """

    def __init__(
        self,
        size: int | Sequence[int] | None = None,
        *,
        mode: str = "resize",
        crop_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        interpolation: str = "bilinear",
        antialias: bool = True,
        grayscale_to_rgb: bool = False,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {_MODES}; got {_short(mode)}.")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"`interpolation` must be one of {_INTERPOLATIONS}; got {_short(interpolation)}."
            )
        if (mean is None) != (std is None):
            raise ValueError("`mean` and `std` must be given together (or neither).")
        self.mode = mode
        if size is None:
            if mode != "resize":
                raise ValueError(f"`size` is required with mode={mode!r}; got None.")
            self.size: tuple[int, int] | int | None = None
        elif mode == "resize":
            self.size = _pair("size", size)
        else:
            self.size = check_positive_int("size", size)
        if crop_size is None and mode == "resize_shortest_then_center_crop":
            crop_size = self.size
        self.crop_size = None if crop_size is None else _pair("crop_size", crop_size)
        self.interpolation = interpolation
        self.antialias = bool(antialias)
        self.grayscale_to_rgb = bool(grayscale_to_rgb)
        self.mean = None if mean is None else _channel_stats("mean", mean, positive=False)
        self.std = None if std is None else _channel_stats("std", std, positive=True)
        if (
            self.mean is not None
            and len(self.mean) != len(self.std)
            and 1 not in (len(self.mean), len(self.std))
        ):
            raise ValueError(
                f"`mean` and `std` must have the same number of channels; got {len(self.mean)} and {len(self.std)}."
            )
        # Non-persistent: derived from the settings above, never part of a saved state dict.
        for key, stats in (("mean_", self.mean), ("std_", self.std)):
            tensor = None if stats is None else torch.tensor(stats, dtype=torch.float32).view(1, -1, 1, 1)
            self.register_buffer(key, tensor, persistent=False)

    # ------------------------------------------------------------------ construction from processors
    @classmethod
    def from_processor(cls, processor: Any, *, grayscale_to_rgb: bool = False) -> ImagePreprocess:
        """Read a transformers image processor's config (or a processor's ``.image_processor``).

        Uses ``do_resize``/``size`` (``{"height", "width"}`` or ``{"shortest_edge"}``),
        ``do_center_crop``/``crop_size``, ``resample``, ``do_normalize``/``image_mean``/``image_std``.
        ``rescale_factor`` is ignored: inputs are already in ``[0, 1]``. Configurations this class
        cannot reproduce (``longest_edge``, ``max_height``, ...) raise ``ValueError``.
        """
        image_processor = getattr(processor, "image_processor", None) or processor
        if not hasattr(image_processor, "image_mean") and not hasattr(image_processor, "size"):
            raise TypeError(
                "`processor` must be a transformers image processor (or a processor holding one, e.g."
                f" CLIPProcessor); got {type(processor).__name__}."
            )
        name = type(image_processor).__name__
        do_resize = bool(getattr(image_processor, "do_resize", True))
        do_crop = bool(getattr(image_processor, "do_center_crop", False))
        size = getattr(image_processor, "size", None) if do_resize else None
        crop = getattr(image_processor, "crop_size", None) if do_crop else None
        crop_pct = getattr(image_processor, "crop_pct", None)

        kwargs: dict[str, Any] = {}
        if size is not None:
            if isinstance(size, Integral):
                size = {"shortest_edge": int(size)} if do_crop else {"height": int(size), "width": int(size)}
            unsupported = [
                k
                for k in ("longest_edge", "max_height", "max_width", "min_pixels", "max_pixels")
                if _size_field(size, k)
            ]
            height, width = _size_field(size, "height"), _size_field(size, "width")
            shortest = _size_field(size, "shortest_edge")
            if unsupported:
                raise ValueError(
                    f"`processor` ({name}) resizes with {unsupported}, which ImagePreprocess does not reproduce;"
                    " build ImagePreprocess(...) by hand with a fixed size instead."
                )
            if crop_pct is not None and name.startswith("ConvNext") and shortest:
                # ConvNeXt: below 384 px, resize the short side to size / crop_pct then crop a square.
                if shortest < 384:
                    kwargs.update(size=int(shortest / crop_pct), mode="resize_shortest_then_center_crop")
                    crop = (shortest, shortest)
                else:
                    kwargs.update(size=(shortest, shortest), mode="resize")
            elif crop_pct is not None:
                raise ValueError(
                    f"`processor` ({name}) uses crop_pct={crop_pct}, which ImagePreprocess does not reproduce"
                    " for this processor type; build ImagePreprocess(...) by hand."
                )
            elif height and width:
                kwargs.update(size=(int(height), int(width)), mode="resize")
            elif shortest:
                mode = "resize_shortest_then_center_crop" if crop is not None else "resize_shortest"
                kwargs.update(size=int(shortest), mode=mode)
            else:
                raise ValueError(
                    f"`processor` ({name}) has a `size` this class does not understand: {size!r}."
                )
        if crop is not None:
            if not isinstance(crop, (tuple, Integral)):
                crop = (int(_size_field(crop, "height")), int(_size_field(crop, "width")))
            kwargs["crop_size"] = crop
        if (
            getattr(image_processor, "do_normalize", True)
            and getattr(image_processor, "image_mean", None) is not None
        ):
            kwargs.update(mean=image_processor.image_mean, std=image_processor.image_std)
        kwargs["interpolation"] = _interpolation_from_resample(getattr(image_processor, "resample", None))
        return cls(**kwargs, grayscale_to_rgb=grayscale_to_rgb)

    # ------------------------------------------------------------------------------------ forward
    def _resize(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        kwargs: dict[str, Any] = {"size": size, "mode": self.interpolation}
        if self.interpolation in ("bilinear", "bicubic"):
            kwargs["align_corners"] = False
            # Antialiased kernels exist for CPU and CUDA only.
            kwargs["antialias"] = self.antialias and x.device.type in ("cpu", "cuda")
        return F.interpolate(x, **kwargs)

    def _center_crop(self, x: Tensor) -> Tensor:
        crop_h, crop_w = self.crop_size
        h, w = x.shape[-2:]
        if crop_h > h or crop_w > w:
            # Zero padding centered like transformers' center_crop (extra pixel on the top/left).
            pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
            top, left = (pad_h + 1) // 2, (pad_w + 1) // 2
            x = F.pad(x, (left, pad_w - left, top, pad_h - top))
            h, w = x.shape[-2:]
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        return x[..., top : top + crop_h, left : left + crop_w]

    def forward(self, x: Tensor) -> Tensor:
        x = _check_batch(x)
        if self.size is not None:
            if self.mode == "resize":
                x = self._resize(x, self.size)
            else:
                h, w = x.shape[-2:]
                short, long = (h, w) if h <= w else (w, h)
                new_long = int(self.size * long / short)
                x = self._resize(x, (self.size, new_long) if h <= w else (new_long, self.size))
        if self.crop_size is not None:
            x = self._center_crop(x)
        if self.grayscale_to_rgb and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.mean_ is not None:
            channels = max(self.mean_.shape[1], self.std_.shape[1])
            if channels != 1 and x.shape[1] != channels:
                hint = " Pass grayscale_to_rgb=True for 1-channel images." if x.shape[1] == 1 else ""
                raise ValueError(
                    f"`x` must have {channels} channels to match the preprocessing mean/std; got shape"
                    f" {tuple(x.shape)}.{hint}"
                )
            mean = self.mean_.to(device=x.device, dtype=x.dtype)
            std = self.std_.to(device=x.device, dtype=x.dtype)
            x = (x - mean) / std
        return x

    def extra_repr(self) -> str:
        def fmt(stats: tuple[float, ...] | None) -> str:
            return "None" if stats is None else "(" + ", ".join(f"{v:.4g}" for v in stats) + ")"

        return (
            f"size={self.size}, mode={self.mode!r}, crop_size={self.crop_size}, "
            f"interpolation={self.interpolation!r}, antialias={self.antialias}, "
            f"mean={fmt(self.mean)}, std={fmt(self.std)}, grayscale_to_rgb={self.grayscale_to_rgb}"
        )


# -------------------------------------------------------------------------------- classifiers
class ImageClassifier(nn.Module):
    """A model seen as ``[0, 1]`` images (N, C, H, W) → logits (N, K).

    ``forward`` moves the input to the model's device and floating dtype, applies ``preprocess``
    (an ``nn.Module``, any callable, or ``None`` when the model normalizes internally), calls the
    model and takes the logits out of its output (tensor, ``.logits``, dict, or tuple head). The
    wrapped model is a submodule: ``.to()``, ``.eval()``, ``.parameters()`` act on it as usual, and
    the wrapper starts in the model's train/eval mode.

    Args:
        model: the classifier, an ``nn.Module``.
        preprocess: applied to the ``[0, 1]`` images before the model; e.g. an :class:`ImagePreprocess`.
        num_classes: number of logits, when known; read from ``model.config.num_labels``
            (transformers) or ``model.num_classes`` (timm) otherwise, else ``None`` until
            :meth:`check_num_classes` has run.
        class_names: optional names of the classes, in logit order.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        preprocess: Callable[[Tensor], Tensor] | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"`model` must be a torch.nn.Module mapping images to logits; got {type(model).__name__}."
                " Wrap a plain function in an nn.Module first."
            )
        if preprocess is not None and not callable(preprocess):
            raise TypeError(
                f"`preprocess` must be an nn.Module, a callable or None; got {type(preprocess).__name__}."
            )
        self.model = model
        # nn.Module registers a Module as a submodule (moved by .to()); a plain callable is kept as is.
        self.preprocess = preprocess
        if num_classes is None:
            num_classes = _infer_num_classes(model)
        self.num_classes = None if num_classes is None else check_positive_int("num_classes", num_classes)
        self.class_names = (
            None if class_names is None else tuple(check_class_names("class_names", class_names))
        )
        if (
            self.class_names is not None
            and self.num_classes is not None
            and len(self.class_names) != self.num_classes
        ):
            raise ValueError(
                f"`class_names` has {len(self.class_names)} names but `num_classes` is {self.num_classes}."
            )
        self._observed_num_classes: int | None = None
        # Only the wrapper's own flag: the model's submodules keep whatever modes they have.
        self.training = model.training

    @classmethod
    def from_transformers(
        cls, model: nn.Module, processor: Any = None, *, grayscale_to_rgb: bool = False
    ) -> ImageClassifier:
        """Wrap a transformers image-classification model (``AutoModelForImageClassification``).

        With ``processor`` (its image processor, or a processor holding one) the preprocessing is
        read from it; without, the images reach the model as ``[0, 1]`` pixels unnormalized.
        ``num_classes`` and ``class_names`` come from ``model.config`` (``num_labels``, ``id2label``).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a transformers PreTrainedModel; got {type(model).__name__}.")
        if _is_contrastive_model(model):
            raise TypeError(
                f"`model` ({type(model).__name__}) is a contrastive image-text model without a classification"
                " head; build it with ZeroShotClassifier.from_clip(model, processor, class_names)."
            )
        config = getattr(model, "config", None)
        preprocess = None
        if processor is not None:
            preprocess = ImagePreprocess.from_processor(processor, grayscale_to_rgb=grayscale_to_rgb)
        elif grayscale_to_rgb:
            preprocess = ImagePreprocess(grayscale_to_rgb=True)
        id2label = getattr(config, "id2label", None) or {}
        num_classes = getattr(config, "num_labels", None) or (len(id2label) or None)
        class_names = None
        if id2label and num_classes == len(id2label):
            names = [str(id2label[i]) for i in sorted(id2label, key=int)]
            if len(set(names)) == len(names) and all(n.strip() for n in names):
                class_names = names
        return cls(model, preprocess=preprocess, num_classes=num_classes, class_names=class_names)

    def _prepare_input(self, x: Tensor) -> Tensor:
        x = _check_batch(x)
        device, dtype = _model_device_dtype(self.model)
        if device is not None and (x.device != device or (dtype is not None and x.dtype != dtype)):
            x = x.to(device=device, dtype=dtype or x.dtype)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self._prepare_input(x)
        batch = x.shape[0]
        if self.preprocess is not None:
            x = self.preprocess(x)
        return extract_logits(self.model(x), batch)

    def check_num_classes(self, num_classes: int, example_input_shape: Sequence[int]) -> int:
        """See :func:`check_num_classes`."""
        return check_num_classes(self, num_classes, example_input_shape)

    def __repr__(self) -> str:
        preprocess = self.preprocess
        pre = "None" if preprocess is None else repr(preprocess).replace("\n", "\n  ")
        return (
            f"{type(self).__name__}(model={type(self.model).__name__}, num_classes={self.num_classes},"
            f" preprocess={pre})"
        )


def _infer_num_classes(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for value in (getattr(config, "num_labels", None), getattr(model, "num_classes", None)):
        if isinstance(value, Integral) and not isinstance(value, bool) and value >= 1:
            return int(value)
    return None


class ZeroShotClassifier(ImageClassifier):
    """CLIP-style zero-shot classifier over a fixed list of class names.

    ``logits = logit_scale.exp() · normalize(image_features) @ text_embeddings.T`` where each row
    of ``text_embeddings`` is the normalized mean over templates of the normalized text features of
    one class (computed once, stored as a buffer). Build it with :meth:`from_clip`.
    """

    def __init__(
        self,
        model: nn.Module,
        text_embeddings: Tensor,
        *,
        class_names: Sequence[str],
        templates: Sequence[str],
        preprocess: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module) or not _is_contrastive_model(model):
            raise TypeError(
                "`model` must be a CLIP-like nn.Module with get_image_features, get_text_features and"
                f" logit_scale; got {type(model).__name__}."
            )
        names = check_class_names("class_names", class_names)
        if text_embeddings.dim() != 2 or text_embeddings.shape[0] != len(names):
            raise ValueError(
                f"`text_embeddings` must have shape ({len(names)}, dim); got {tuple(text_embeddings.shape)}."
            )
        super().__init__(model, preprocess=preprocess, num_classes=len(names), class_names=names)
        self.templates = tuple(templates)
        self.register_buffer("text_embeddings", text_embeddings.detach().clone())

    @classmethod
    def from_clip(
        cls,
        model: nn.Module,
        processor_or_tokenizer: Any,
        class_names: Sequence[str],
        templates: Sequence[str] = ("a photo of a {}.",),
        *,
        image_preprocess: Callable[[Tensor], Tensor] | None = None,
        batch_size: int = 256,
    ) -> ZeroShotClassifier:
        """Zero-shot classifier from a CLIP model and the class names.

        Args:
            model: e.g. ``CLIPModel.from_pretrained("openai/clip-vit-base-patch32")``.
            processor_or_tokenizer: the matching ``CLIPProcessor`` (tokenizer and image processor)
                or just its tokenizer.
            class_names: one name per class, in logit order.
            templates: prompts with one ``{}`` slot for the class name; the class embedding is the
                normalized mean over templates.
            image_preprocess: overrides the image preprocessing; by default it is read from the
                processor's image processor, else built from ``model.config.vision_config.image_size``
                with CLIP's mean/std (bicubic, short side resize then center crop).
            batch_size: prompts encoded per text-encoder call.
        """
        if not isinstance(model, nn.Module) or not _is_contrastive_model(model):
            raise TypeError(
                "`model` must be a CLIP-like nn.Module with get_image_features, get_text_features and"
                f" logit_scale; got {type(model).__name__}."
            )
        names = check_class_names("class_names", class_names)
        if isinstance(templates, str) or not isinstance(templates, Sequence) or not templates:
            raise ValueError(f"`templates` must be a non-empty sequence of strings; got {_short(templates)}.")
        for i, template in enumerate(templates):
            if not isinstance(template, str) or template.count("{}") != 1:
                raise ValueError(
                    f"`templates[{i}]` must be a string with one '{{}}' slot; got {_short(template)}."
                )
        batch_size = check_positive_int("batch_size", batch_size)
        tokenizer = getattr(processor_or_tokenizer, "tokenizer", None) or processor_or_tokenizer
        if not callable(tokenizer):
            raise TypeError(
                "`processor_or_tokenizer` must be a CLIP processor or tokenizer; got"
                f" {type(processor_or_tokenizer).__name__}."
            )
        if image_preprocess is None:
            image_processor = getattr(processor_or_tokenizer, "image_processor", None)
            if image_processor is not None:
                image_preprocess = ImagePreprocess.from_processor(image_processor)
            else:
                image_size = getattr(getattr(model.config, "vision_config", None), "image_size", None)
                if image_size is None:
                    raise ValueError(
                        "`model.config.vision_config.image_size` is missing; pass `image_preprocess` or a processor."
                    )
                image_preprocess = ImagePreprocess(
                    image_size,
                    mode="resize_shortest_then_center_crop",
                    mean=CLIP_MEAN,
                    std=CLIP_STD,
                    interpolation="bicubic",
                )
        text_config = getattr(model.config, "text_config", None)
        max_length = getattr(text_config, "max_position_embeddings", None) or 77
        prompts = [template.format(name) for name in names for template in templates]
        device, _ = _model_device_dtype(model)
        features = []
        with _eval_mode(model), torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                tokens = tokenizer(
                    prompts[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                inputs = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
                features.append(F.normalize(_feature_tensor(model.get_text_features(**inputs)), dim=-1))
        per_prompt = torch.cat(features).view(len(names), len(templates), -1)
        text_embeddings = F.normalize(per_prompt.mean(dim=1), dim=-1)
        return cls(
            model, text_embeddings, class_names=names, templates=templates, preprocess=image_preprocess
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self._prepare_input(x)
        if self.preprocess is not None:
            x = self.preprocess(x)
        image = F.normalize(_feature_tensor(self.model.get_image_features(pixel_values=x)), dim=-1)
        text = self.text_embeddings.to(device=image.device, dtype=image.dtype)
        return self.model.logit_scale.exp() * image @ text.T

    def __repr__(self) -> str:
        pre = "None" if self.preprocess is None else repr(self.preprocess).replace("\n", "\n  ")
        return (
            f"ZeroShotClassifier(model={type(self.model).__name__}, num_classes={self.num_classes},"
            f" num_templates={len(self.templates)}, templates={list(self.templates)!r}, preprocess={pre})"
        )


def _feature_tensor(output: Any) -> Tensor:
    """Projected features from get_image_features / get_text_features.

    transformers 4 returns the tensor; transformers 5 returns a ``BaseModelOutputWithPooling``
    whose ``pooler_output`` holds the projected features.
    """
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    raise TypeError(
        f"expected features as a tensor or an output with `pooler_output`; got {type(output).__name__}."
    )


# ------------------------------------------------------------------------------- entry points
def as_image_classifier(
    model: Any,
    *,
    preprocess: Any = None,
    num_classes: int | None = None,
) -> ImageClassifier:
    """The library's single entry point: any classifier → :class:`ImageClassifier`.

    Accepts a plain ``nn.Module`` returning logits (torchvision / timm style), a transformers
    image-classification model, a :class:`ZeroShotClassifier` or an :class:`ImageClassifier`
    (both returned as they are). ``preprocess`` may be an ``nn.Module``, a callable, or a
    transformers image processor / processor (read with :meth:`ImagePreprocess.from_processor`).
    """
    if isinstance(model, ImageClassifier):
        if preprocess is not None:
            raise ValueError(
                f"`model` is already a {type(model).__name__} (with its own preprocess); `preprocess` must be"
                " None, got one. Set it when building the classifier."
            )
        if num_classes is not None:
            num_classes = check_positive_int("num_classes", num_classes)
            if model.num_classes is not None and model.num_classes != num_classes:
                raise ValueError(
                    f"`model` has {model.num_classes} classes but `num_classes` is {num_classes}."
                )
            model.num_classes = num_classes
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be a torch.nn.Module (plain, transformers or timm) or an ImageClassifier; got"
            f" {type(model).__name__}."
        )
    if _is_contrastive_model(model):
        raise TypeError(
            f"`model` ({type(model).__name__}) is a contrastive image-text model and needs the class names:"
            " use ZeroShotClassifier.from_clip(model, processor, class_names)."
        )
    if _is_hf_image_processor(preprocess):
        preprocess = ImagePreprocess.from_processor(preprocess)
    class_names = None
    if _is_hf_model(model):
        from_config = ImageClassifier.from_transformers(model)
        if num_classes is not None:
            num_classes = check_positive_int("num_classes", num_classes)
            if from_config.num_classes not in (None, num_classes):
                raise ValueError(
                    f"`model` has config.num_labels={from_config.num_classes} but `num_classes` is {num_classes}."
                )
        num_classes = num_classes or from_config.num_classes
        class_names = from_config.class_names
    return ImageClassifier(model, preprocess=preprocess, num_classes=num_classes, class_names=class_names)


def check_num_classes(classifier: nn.Module, num_classes: int, example_input_shape: Sequence[int]) -> int:
    """Check that the classifier returns ``num_classes`` logits; return that number.

    Runs one forward pass (eval mode, no grad, previous modes restored) on a mid-gray dummy batch
    of ``example_input_shape`` (``(C, H, W)`` or ``(N, C, H, W)``) the first time; later calls
    reuse the observed count. Raises ``ValueError`` on a mismatch.
    """
    classifier = as_image_classifier(classifier)
    num_classes = check_positive_int("num_classes", num_classes)
    observed = classifier._observed_num_classes
    if observed is None:
        shape = tuple(example_input_shape)
        if len(shape) == 3:
            shape = (1, *shape)
        if len(shape) != 4 or not all(isinstance(s, Integral) and s >= 1 for s in shape):
            raise ValueError(
                f"`example_input_shape` must be (C, H, W) or (N, C, H, W) of positive integers; got {_short(shape)}."
            )
        device, dtype = _model_device_dtype(classifier.model)
        dummy = torch.full(shape, 0.5, device=device, dtype=dtype or torch.float32)
        try:
            with _eval_mode(classifier), torch.no_grad():
                logits = classifier(dummy)
        except RuntimeError as error:
            raise ValueError(f"`model` failed on a dummy input of shape {shape}: {error}") from error
        observed = classifier._observed_num_classes = int(logits.shape[1])
    if observed != num_classes:
        raise ValueError(
            f"`model` returns {observed} logits but {num_classes} class names were given; the class names must"
            " list the classifier's classes in logit order."
        )
    classifier.num_classes = observed
    return observed
