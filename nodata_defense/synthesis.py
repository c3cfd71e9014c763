"""Step 1 of the method: reference images synthesized from class names, cached and resumable.

``synthesize(class_names, generator, config, cache_dir)`` turns each class name into prompts
(``config.templates``, cycled over the shots), asks a text-to-image *generator* for
``config.shots_per_class`` images per class and returns a :class:`ReferenceSet`. Every generator
follows one small protocol (:class:`ImageGenerator`):

- :class:`DeepFloydIFGenerator`: the paper's two-stage DeepFloyd IF (64 px, then 256 px);
- :class:`DiffusersText2ImageGenerator`: any diffusers text-to-image pipeline (Stable Diffusion, ...);
- :class:`PixelDiffusionGenerator`: a pixel-space ``UNet2DConditionModel`` + scheduler + text encoder
  (the bundled digits model);
- :class:`CallableGenerator`: a user function ``(prompts, torch.Generator) -> images``.

:func:`load_reference_folder` reads a user's own images (``root/<class name>/*.png``) instead.

Every image has its own seed, derived from ``(config.seed, class name, shot)``, and its own
``torch.Generator``, so (where the back-end allows per-image generators) an image does not depend
on the batch it was drawn in. Images are quantized to 8 bits on every path, so a set read back from
the cache is bit-identical to the freshly generated one.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import io
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ._io import atomic_write_bytes, atomic_write_json
from ._validation import _short, check_class_names, check_images, check_positive_int
from .config import PAPER_GENERATOR, PAPER_UPSCALER, SynthesisConfig

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CallableGenerator",
    "DeepFloydIFGenerator",
    "DiffusersText2ImageGenerator",
    "ImageGenerator",
    "PixelDiffusionGenerator",
    "ReferenceSet",
    "build_prompts",
    "image_seed",
    "load_reference_folder",
    "paper_guidance_scale",
    "synthesize",
]

CACHE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# PNG holds grey, RGB and RGBA; other channel counts cannot be cached as images.
_PNG_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


# ------------------------------------------------------------------------------------- the result
@dataclass(frozen=True, eq=False)
class ReferenceSet:
    """Labelled reference images: ``images`` ``(N, C, H, W)`` float in ``[0, 1]``, ``labels`` ``(N,)``.

    ``labels[i]`` indexes ``class_names``; ``prompts[i]`` is the text image ``i`` was generated from
    (for folder images: the loader's template filled with the class name). ``metadata`` is a JSON-able
    dict (generator id, revision, settings, per-image seeds, cache statistics).
    """

    images: Tensor
    labels: Tensor
    class_names: list[str]
    prompts: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        images = check_images(self.images, "images")
        if images.dtype != torch.float32:
            images = images.float()
        names = check_class_names("class_names", self.class_names)
        labels = self.labels
        if not isinstance(labels, Tensor):
            raise TypeError(f"`labels` must be a torch.Tensor of class indices; got {type(labels).__name__}.")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"`labels` must have shape ({images.shape[0]},), one per image; got {tuple(labels.shape)}."
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(f"`labels` must hold integer class indices; got dtype {labels.dtype}.")
        labels = labels.long()
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(names)):
            raise ValueError(
                f"`labels` must be in [0, {len(names) - 1}] (one per class name); got values in"
                f" [{int(labels.min())}, {int(labels.max())}]."
            )
        prompts = self.prompts
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"`prompts` must be a list of strings; got {_short(prompts)}.")
        prompts = list(prompts)
        if len(prompts) != images.shape[0] or not all(isinstance(p, str) for p in prompts):
            raise ValueError(
                f"`prompts` must hold one string per image ({images.shape[0]}); got {len(prompts)} item(s)."
            )
        if not isinstance(self.metadata, Mapping):
            raise TypeError(f"`metadata` must be a dict; got {type(self.metadata).__name__}.")
        try:
            # A private JSON copy: the set stays frozen and can always be written to a manifest.
            metadata = json.loads(json.dumps(dict(self.metadata)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"`metadata` must be JSON-serializable: {exc}") from None
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "metadata", metadata)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def class_counts(self) -> dict[str, int]:
        """Number of images of each class (classes without images count 0)."""
        counts = torch.bincount(self.labels, minlength=self.num_classes).tolist()
        return dict(zip(self.class_names, counts, strict=True))

    def subset(
        self, indices: Sequence[int] | Tensor | None = None, *, classes: Sequence[str] | None = None
    ) -> ReferenceSet:
        """The images at ``indices`` and/or of the named ``classes``; labels keep their meaning.

        ``class_names`` is unchanged (labels still index it), so a subset plugs into the same classifier.
        """
        keep = torch.ones(len(self), dtype=torch.bool)
        if indices is not None:
            index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
            if len(index) and (int(index.min()) < -len(self) or int(index.max()) >= len(self)):
                raise IndexError(f"`indices` must be in [0, {len(self) - 1}]; got {_short(index.tolist())}.")
            chosen = torch.zeros(len(self), dtype=torch.bool)
            chosen[index] = True
            keep &= chosen
        if classes is not None:
            if isinstance(classes, str):
                classes = [classes]
            unknown = [c for c in classes if c not in self.class_names]
            if unknown:
                raise ValueError(
                    f"`classes` names unknown class(es) {unknown}; known: {_short(self.class_names)}."
                )
            wanted = torch.tensor([self.class_names.index(c) for c in classes], dtype=torch.long)
            keep &= torch.isin(self.labels, wanted)
        where = torch.nonzero(keep).flatten()
        if len(where) == 0:
            raise ValueError("the subset is empty: no image matches `indices` and `classes`.")
        metadata = dict(self.metadata)
        if "seeds" in metadata and len(metadata["seeds"]) == len(self):
            metadata["seeds"] = [metadata["seeds"][i] for i in where.tolist()]
        if "files" in metadata and len(metadata["files"]) == len(self):
            metadata["files"] = [metadata["files"][i] for i in where.tolist()]
        return ReferenceSet(
            images=self.images[where],
            labels=self.labels[where],
            class_names=list(self.class_names),
            prompts=[self.prompts[i] for i in where.tolist()],
            metadata=metadata,
        )

    def to_channels(self, channels: int) -> ReferenceSet:
        """Grey → RGB by repetition, RGB → grey by ITU-R BT.601 luma; same set if already ``channels``."""
        channels = check_positive_int("channels", channels)
        c = self.image_shape[0]
        if channels == c:
            return self
        if c == 1 and channels == 3:
            images = self.images.repeat(1, 3, 1, 1)
        elif c == 3 and channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=self.images.dtype).view(1, 3, 1, 1)
            images = (self.images * weights).sum(dim=1, keepdim=True).clamp(0, 1)
        else:
            raise ValueError(f"cannot convert {c}-channel images to {channels} channels (only 1 <-> 3).")
        return self._replace_images(images)

    def resized(self, size: int | tuple[int, int]) -> ReferenceSet:
        """Images resized to ``size`` (an int: shorter side to ``size``, then a centred square crop)."""
        return self._replace_images(_resize_images(self.images, size))

    def _replace_images(self, images: Tensor) -> ReferenceSet:
        return ReferenceSet(
            images, self.labels, list(self.class_names), list(self.prompts), dict(self.metadata)
        )

    def __repr__(self) -> str:
        generator = self.metadata.get("generator", {}).get("id") if isinstance(self.metadata, dict) else None
        return (
            f"ReferenceSet(num_images={len(self)}, num_classes={self.num_classes}, "
            f"image_shape={self.image_shape}, generator={generator!r})"
        )


# ------------------------------------------------------------------------------------ prompts/seeds
def paper_guidance_scale(shots_per_class: int) -> float:
    """The paper's classifier-free guidance: 7.0 for one image per class, 4.0 for more."""
    return 7.0 if shots_per_class == 1 else 4.0


def build_prompts(class_names: Sequence[str], config: SynthesisConfig | None = None) -> list[list[str]]:
    """Prompts ``[class][shot]``: template ``shot % len(templates)`` filled with the class text.

    The class text is ``config.class_prompts[name]`` when given, else the class name itself.
    """
    config = _check_config(config)
    names = check_class_names("class_names", class_names)
    _check_class_prompts(config, names)
    templates = config.templates
    return [
        [
            templates[shot % len(templates)].format(config.class_prompts.get(name, name))
            for shot in range(config.shots_per_class)
        ]
        for name in names
    ]


def image_seed(seed: int, class_name: str, shot: int) -> int:
    """The seed of one image: a hash of ``(seed, class name, shot)``, 63 bits.

    It depends on the class *name*, not its position, so adding, removing or reordering classes
    leaves every other class's images (and their cache entries) unchanged.
    """
    digest = hashlib.sha256(json.dumps([int(seed), class_name, int(shot)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _derived_seed(seed: int, purpose: str) -> int:
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _cpu_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    # CPU generators give the same noise on every device (diffusers draws on CPU, then moves).
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def _check_config(config: Any) -> SynthesisConfig:
    if config is None:
        return SynthesisConfig()
    if not isinstance(config, SynthesisConfig):
        raise TypeError(f"`config` must be a SynthesisConfig; got {type(config).__name__}.")
    return config


def _check_class_prompts(config: SynthesisConfig, names: list[str]) -> None:
    unknown = [k for k in config.class_prompts if k not in names]
    if unknown:
        raise ValueError(
            f"`config.class_prompts` has key(s) {unknown} that are not class names; known: {_short(names)}."
        )
    for name, text in config.class_prompts.items():
        if not text.strip():
            raise ValueError(f"`config.class_prompts[{name!r}]` must be a non-empty string; got {text!r}.")


# ------------------------------------------------------------------------------- image conversion
def _to_unit_images(output: Any, count: int, what: str) -> Tensor:
    """A generator's output (NCHW tensor, NHWC array, or list of PIL images) as float NCHW on CPU."""
    if isinstance(output, (list, tuple)) and output and _is_pil(output[0]):
        arrays = [np.asarray(img) for img in output]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(
                f"{what} returned PIL images of different sizes {sorted({a.shape for a in arrays})}."
            )
        array = np.stack(arrays)
        if array.ndim == 3:
            array = array[..., None]
        images = torch.from_numpy(array.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    elif isinstance(output, np.ndarray):
        array = output
        if array.ndim == 3:
            array = array[..., None]
        if array.ndim != 4:
            raise ValueError(f"{what} returned an array of shape {array.shape}; expected (N, H, W, C).")
        scale = 255.0 if array.dtype == np.uint8 else 1.0
        images = torch.from_numpy(np.ascontiguousarray(array).astype(np.float32) / scale).permute(0, 3, 1, 2)
    elif isinstance(output, Tensor):
        images = output.detach()
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        images = images.to("cpu", torch.float32)
    else:
        raise TypeError(
            f"{what} must return a float tensor (N, C, H, W) in [0, 1], an (N, H, W, C) array or a list of"
            f" PIL images; got {type(output).__name__}."
        )
    images = check_images(images.contiguous(), f"the images returned by {what}")
    if images.shape[0] != count:
        raise ValueError(f"{what} returned {images.shape[0]} image(s) for {count} prompt(s).")
    return images


def _is_pil(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(obj, Image.Image)


def _to_uint8(images: Tensor) -> Tensor:
    return torch.round(images.clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def _quantize(images: Tensor) -> Tensor:
    """8-bit values as floats: exactly what a PNG round trip gives back."""
    return _to_uint8(images).float() / 255.0


def _resize_images(images: Tensor, size: int | tuple[int, int]) -> Tensor:
    if isinstance(size, int):
        size = check_positive_int("size", size)
        h, w = images.shape[-2:]
        if (h, w) == (size, size):
            return images
        scale = size / min(h, w)
        new = (max(size, round(h * scale)), max(size, round(w * scale)))
        images = _interpolate(images, new)
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
        return images[..., top : top + size, left : left + size].contiguous()
    height, width = (check_positive_int("size[0]", size[0]), check_positive_int("size[1]", size[1]))
    return _interpolate(images, (height, width))


def _interpolate(images: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    down = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    out = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=down)
    return out.clamp(0.0, 1.0)


def _png_bytes(image: Tensor) -> bytes:
    from PIL import Image

    c = image.shape[0]
    if c not in _PNG_MODES:
        raise ValueError(f"only 1-, 3- or 4-channel images can be cached as PNG; got {c} channels.")
    array = _to_uint8(image).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if c == 1 else array, mode=None).save(buffer, format="PNG")
    return buffer.getvalue()


def _read_png(data: bytes, channels: int) -> Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert(_PNG_MODES[channels]) if img.mode != _PNG_MODES[channels] else img
        array = np.array(img)
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


# -------------------------------------------------------------------------------- generator protocol
@runtime_checkable
class ImageGenerator(Protocol):
    """What :func:`synthesize` needs from a text-to-image back-end.

    ``generate`` returns one image per prompt, float ``(N, C, H, W)`` in ``[0, 1]`` (any device);
    image ``i`` must be determined by ``prompts[i]``, ``seeds[i]`` and the settings. ``id`` and
    ``revision`` name the model, and ``settings`` holds every other option that changes the
    output: together they key the on-disk cache.
    """

    id: str
    revision: str | None

    @property
    def settings(self) -> dict[str, Any]: ...

    def generate(
        self, prompts: list[str], seeds: list[int], *, guidance_scale: float, num_inference_steps: int
    ) -> Tensor: ...


def _local_revision(path: str | os.PathLike) -> str:
    """A content hash of a local pipeline directory, so the cache notices retrained weights.

    Only the components (sub-folders) and ``model_index.json`` count: a rewritten README or training
    log at the top level does not change the images.
    """
    root = Path(path)
    files = [
        p
        for p in root.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and (p.parent != root or p.name == "model_index.json")
    ]
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def _model_id_and_revision(
    source: str | os.PathLike, revision: str | None, id: str | None
) -> tuple[str, str | None]:
    text = os.fspath(source)
    if os.path.isdir(text):
        # A moved directory keeps its cache; changed weights do not.
        return id or Path(text).resolve().name, _local_revision(text)
    return id or text, revision


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _scheduler_description(scheduler: Any) -> dict[str, Any]:
    # Private keys ("_diffusers_version", "_use_default_values" in set order) would make the key unstable.
    config = {k: v for k, v in dict(getattr(scheduler, "config", {}) or {}).items() if not k.startswith("_")}
    return _json_safe({"class": type(scheduler).__name__, "config": config})


def _disable_progress(pipe: Any) -> None:
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)


# ---------------------------------------------------------------------------------- DeepFloyd IF
@dataclass(frozen=True)
class _StageOne:
    """Stage-I results of one batch, kept on CPU until stage II runs."""

    images: Tensor  # [-1, 1], 64 px
    prompt_embeds: Tensor
    negative_embeds: Tensor
    seeds: list[int]


class DeepFloydIFGenerator:
    """DeepFloyd IF as in the paper: stage I (``IFPipeline``, 64 px) then stage II
    (``IFSuperResolutionPipeline``, to 256 px), stage II reusing stage I's T5 prompt embeddings.

    ``guidance_scale`` and ``num_inference_steps`` of :func:`synthesize` drive stage I (paper: 100
    steps, 7.0 / 4.0); stage II runs with ``stage2_steps`` / ``stage2_guidance_scale`` /
    ``noise_level`` (the pipeline's defaults 50 / 4.0 / 250, as the paper's code uses). IF's safety
    checker and watermarker are not applied (tensor outputs, as in the paper's code).
    """

    def __init__(
        self,
        stage1: Any,
        stage2: Any,
        *,
        id: str = PAPER_GENERATOR,
        revision: str | None = None,
        stage2_id: str = PAPER_UPSCALER,
        stage2_revision: str | None = None,
        stage2_steps: int = 50,
        stage2_guidance_scale: float = 4.0,
        noise_level: int = 250,
    ) -> None:
        for name, pipe in (("stage1", stage1), ("stage2", stage2)):
            if not callable(pipe) or not hasattr(pipe, "unet"):
                raise TypeError(f"`{name}` must be a diffusers IF pipeline; got {type(pipe).__name__}.")
        if not hasattr(stage1, "encode_prompt") or getattr(stage1, "text_encoder", None) is None:
            raise ValueError("`stage1` must be an IFPipeline with its T5 text encoder and tokenizer.")
        self.stage1: Any = stage1
        self.stage2 = stage2
        self.id = str(id)
        self.revision = revision
        self.stage2_id = str(stage2_id)
        self.stage2_revision = stage2_revision
        self.stage2_steps = check_positive_int("stage2_steps", stage2_steps)
        if not (isinstance(stage2_guidance_scale, (int, float)) and stage2_guidance_scale >= 0):
            raise ValueError(
                f"`stage2_guidance_scale` must be a number >= 0; got {_short(stage2_guidance_scale)}."
            )
        self.stage2_guidance_scale = float(stage2_guidance_scale)
        if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level < 1000:
            raise ValueError(f"`noise_level` must be an integer in [0, 999]; got {_short(noise_level)}.")
        self.noise_level = noise_level
        self._stage1_scheduler_description = _scheduler_description(stage1.scheduler)
        _disable_progress(stage1)
        _disable_progress(stage2)

    @classmethod
    def from_pretrained(
        cls,
        stage1_id: str | os.PathLike = PAPER_GENERATOR,
        stage2_id: str | os.PathLike = PAPER_UPSCALER,
        *,
        revision: str | None = None,
        stage2_revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        device: str | torch.device | None = None,
        cpu_offload: bool = False,
        stage2_steps: int = 50,
        stage2_guidance_scale: float = 4.0,
        noise_level: int = 250,
    ) -> DeepFloydIFGenerator:
        """Load both stages (safetensors only); stage II without a text encoder.

        On a 16 GB GPU use ``torch_dtype=torch.float16, variant="fp16", cpu_offload=True`` (each model
        moves to the GPU only while it runs). The IF weights are gated: accept the licence on the Hub
        and log in first.
        """
        from diffusers import IFPipeline, IFSuperResolutionPipeline

        common: dict[str, Any] = {
            "torch_dtype": torch_dtype,
            "variant": variant,
            "use_safetensors": True,
            "safety_checker": None,
            "feature_extractor": None,
            "watermarker": None,
            "requires_safety_checker": False,
        }
        stage1 = IFPipeline.from_pretrained(os.fspath(stage1_id), revision=revision, **common)
        stage2 = IFSuperResolutionPipeline.from_pretrained(
            os.fspath(stage2_id), revision=stage2_revision, text_encoder=None, **common
        )
        for pipe in (stage1, stage2):
            if cpu_offload:
                pipe.enable_model_cpu_offload(**({"device": device} if device is not None else {}))
            elif device is not None:
                pipe.to(device)
        id1, rev1 = _model_id_and_revision(stage1_id, revision, None)
        id2, rev2 = _model_id_and_revision(stage2_id, stage2_revision, None)
        return cls(
            stage1,
            stage2,
            id=id1,
            revision=rev1,
            stage2_id=id2,
            stage2_revision=rev2,
            stage2_steps=stage2_steps,
            stage2_guidance_scale=stage2_guidance_scale,
            noise_level=noise_level,
        )

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "stage2_id": self.stage2_id,
            "stage2_revision": self.stage2_revision,
            "stage2_steps": self.stage2_steps,
            "stage2_guidance_scale": self.stage2_guidance_scale,
            "noise_level": self.noise_level,
            "stage1_scheduler": self._stage1_scheduler(),
            "stage2_scheduler": _scheduler_description(self.stage2.scheduler),
        }

    def _stage1_scheduler(self) -> dict[str, Any]:
        # Remembered, so a generator whose stage I was freed still finds its cache entries.
        if self.stage1 is not None:
            self._stage1_scheduler_description = _scheduler_description(self.stage1.scheduler)
        return self._stage1_scheduler_description

    @torch.no_grad()
    def generate_stage_one(
        self, prompts: list[str], seeds: list[int], *, guidance_scale: float, num_inference_steps: int
    ) -> _StageOne:
        if self.stage1 is None:
            raise RuntimeError(
                "stage I of this DeepFloydIFGenerator was freed (free_stage_one); build a new generator."
            )
        # Negative embeddings are always computed: stage II guides with them even if stage I does not.
        embeds, negative = self.stage1.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=True,
            device=self.stage1._execution_device,
            clean_caption=False,
        )
        low = self.stage1(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=_cpu_generators(seeds),
            output_type="pt",
            clean_caption=False,
        ).images
        return _StageOne(low.detach().cpu(), embeds.detach().cpu(), negative.detach().cpu(), list(seeds))

    @torch.no_grad()
    def generate_stage_two(self, stage_one: _StageOne) -> Tensor:
        # Stage II's noise has its own seeds, so freeing stage I in between changes nothing.
        seeds = [_derived_seed(s, "if-stage-2") for s in stage_one.seeds]
        high = self.stage2(
            image=stage_one.images,
            prompt_embeds=stage_one.prompt_embeds,
            negative_prompt_embeds=stage_one.negative_embeds,
            num_inference_steps=self.stage2_steps,
            guidance_scale=self.stage2_guidance_scale,
            noise_level=self.noise_level,
            generator=_cpu_generators(seeds),
            output_type="pt",
            clean_caption=False,
        ).images
        # IF's tensor output is in model space [-1, 1].
        return ((high.float() + 1) / 2).clamp(0, 1).cpu()

    def generate(
        self, prompts: list[str], seeds: list[int], *, guidance_scale: float, num_inference_steps: int
    ) -> Tensor:
        return self.generate_stage_two(
            self.generate_stage_one(
                prompts, seeds, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps
            )
        )

    def free_stage_one(self) -> None:
        """Drop stage I (the 4.3 B-parameter UNet and the 4.8 B-parameter T5) to make room for stage II."""
        self.stage1 = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __repr__(self) -> str:
        return (
            f"DeepFloydIFGenerator(id={self.id!r}, stage2_id={self.stage2_id!r}, stage2_steps={self.stage2_steps},"
            f" stage2_guidance_scale={self.stage2_guidance_scale:g}, noise_level={self.noise_level},"
            f" stage_one_loaded={self.stage1 is not None})"
        )


# -------------------------------------------------------------------------- any diffusers pipeline
class DiffusersText2ImageGenerator:
    """Any diffusers text-to-image pipeline called as ``pipe(prompt=..., generator=[...], ...)``.

    Each image gets its own ``torch.Generator``, so results do not depend on the batch size for
    pipelines that draw their initial noise per image (Stable Diffusion, SDXL, ...). ``call_kwargs``
    are passed to every call (e.g. ``negative_prompt``, ``height``/``width``) and key the cache too.
    A pipeline's safety checker, if loaded, blacks out images it flags: load it with
    ``safety_checker=None`` for research use if that is acceptable for you.
    """

    def __init__(
        self,
        pipeline: Any,
        *,
        id: str | None = None,
        revision: str | None = None,
        call_kwargs: Mapping[str, Any] | None = None,
        output_type: str = "np",
    ) -> None:
        if not callable(pipeline):
            raise TypeError(
                f"`pipeline` must be a callable diffusers pipeline; got {type(pipeline).__name__}."
            )
        reserved = {
            "prompt",
            "generator",
            "num_inference_steps",
            "guidance_scale",
            "output_type",
            "num_images_per_prompt",
        }
        clash = sorted(reserved.intersection(call_kwargs or {}))
        if clash:
            raise ValueError(f"`call_kwargs` must not set {clash}: synthesize() controls them.")
        self.pipeline = pipeline
        name = getattr(getattr(pipeline, "config", None), "_name_or_path", None) or type(pipeline).__name__
        self.id = str(id or name)
        self.revision = revision
        self.call_kwargs = dict(call_kwargs or {})
        if output_type not in ("np", "pt", "pil"):
            raise ValueError(f"`output_type` must be 'np', 'pt' or 'pil'; got {output_type!r}.")
        self.output_type = output_type
        _disable_progress(pipeline)

    @classmethod
    def from_pretrained(
        cls,
        model_id: str | os.PathLike,
        *,
        revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        device: str | torch.device | None = None,
        cpu_offload: bool = False,
        call_kwargs: Mapping[str, Any] | None = None,
        id: str | None = None,
        **pipeline_kwargs: Any,
    ) -> DiffusersText2ImageGenerator:
        """``AutoPipelineForText2Image.from_pretrained`` (falling back to ``DiffusionPipeline``),
        safetensors only; ``pipeline_kwargs`` go to the loader (e.g. ``safety_checker=None``)."""
        from diffusers import AutoPipelineForText2Image, DiffusionPipeline

        source = os.fspath(model_id)
        kwargs = {
            "revision": revision,
            "torch_dtype": torch_dtype,
            "variant": variant,
            "use_safetensors": True,
        }
        kwargs.update(pipeline_kwargs)
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(source, **kwargs)
        except ValueError as exc:
            if "AutoPipeline" not in str(exc):
                raise
            pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
        if cpu_offload:
            pipe.enable_model_cpu_offload(**({"device": device} if device is not None else {}))
        elif device is not None:
            pipe.to(device)
        model_name, model_revision = _model_id_and_revision(source, revision, id)
        return cls(pipe, id=model_name, revision=model_revision, call_kwargs=call_kwargs)

    @property
    def settings(self) -> dict[str, Any]:
        return _json_safe(
            {
                "pipeline": type(self.pipeline).__name__,
                "scheduler": _scheduler_description(getattr(self.pipeline, "scheduler", None)),
                "call_kwargs": self.call_kwargs,
            }
        )

    @torch.no_grad()
    def generate(
        self, prompts: list[str], seeds: list[int], *, guidance_scale: float, num_inference_steps: int
    ) -> Tensor:
        output = self.pipeline(
            prompt=list(prompts),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=_cpu_generators(seeds),
            output_type=self.output_type,
            **self.call_kwargs,
        )
        images = output.images if hasattr(output, "images") else output[0]
        return _to_unit_images(images, len(prompts), type(self.pipeline).__name__)

    def __repr__(self) -> str:
        return (
            f"DiffusersText2ImageGenerator(id={self.id!r}, revision={self.revision!r},"
            f" pipeline={type(self.pipeline).__name__}, call_kwargs={self.call_kwargs!r})"
        )


# ---------------------------------------------------------------------- pixel-space text-to-image
class PixelDiffusionGenerator:
    """A text-conditioned pixel-space diffusion model given as components, with classifier-free guidance.

    ``unet`` is a ``UNet2DConditionModel`` predicting ε in model space ``[-1, 1]``; ``scheduler`` its
    training scheduler (e.g. ``DDPMScheduler``); prompts are encoded as the Stable Diffusion pipeline
    does for CLIP (padded to the tokenizer's length, last hidden state). ``sampler="ddim"`` samples
    with a ``DDIMScheduler`` built from the scheduler's config (trailing timestep spacing, so the
    first step starts from pure noise; ``eta`` = 0 is deterministic given the initial noise);
    ``sampler="scheduler"`` uses ``scheduler`` itself. Guidance follows diffusers: ``guidance_scale
    > 1`` mixes in the ``negative_prompt`` branch (``""``: the unconditional model), otherwise only
    the prompt branch runs.
    """

    def __init__(
        self,
        unet: Any,
        scheduler: Any,
        text_encoder: Any,
        tokenizer: Any,
        *,
        id: str = "pixel-diffusion",
        revision: str | None = None,
        sampler: str = "ddim",
        eta: float = 0.0,
        negative_prompt: str = "",
    ) -> None:
        from diffusers import UNet2DConditionModel

        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(f"`unet` must be a diffusers UNet2DConditionModel; got {type(unet).__name__}.")
        if not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "step"):
            raise TypeError(f"`scheduler` must be a diffusers scheduler; got {type(scheduler).__name__}.")
        if not isinstance(text_encoder, torch.nn.Module):
            raise TypeError(
                f"`text_encoder` must be a torch module (e.g. CLIPTextModel); got {type(text_encoder).__name__}."
            )
        if not callable(tokenizer):
            raise TypeError(f"`tokenizer` must be a transformers tokenizer; got {type(tokenizer).__name__}.")
        if sampler not in ("ddim", "scheduler"):
            raise ValueError(f"`sampler` must be 'ddim' or 'scheduler'; got {sampler!r}.")
        if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
            raise ValueError(f"`eta` must be a number in [0, 1]; got {_short(eta)}.")
        if not isinstance(negative_prompt, str):
            raise TypeError(f"`negative_prompt` must be a string; got {type(negative_prompt).__name__}.")
        self.unet = unet
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.id = str(id)
        self.revision = revision
        self.sampler = sampler
        self.eta = float(eta)
        self.negative_prompt = negative_prompt
        self._embeddings: dict[str, Tensor] = {}

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        *,
        revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        id: str | None = None,
        sampler: str = "ddim",
        eta: float = 0.0,
        negative_prompt: str = "",
    ) -> PixelDiffusionGenerator:
        """Load ``<dir>/unet``, ``<dir>/scheduler``, ``<dir>/text_encoder``, ``<dir>/tokenizer`` (safetensors).

        A local directory is identified by its name (``id``) and a hash of its files (``revision``),
        so moving it keeps its cache entries and retraining it invalidates them.
        """
        import diffusers
        from diffusers import DDPMScheduler, SchedulerMixin, UNet2DConditionModel

        from .denoiser import _load_text_encoder

        source = os.fspath(path_or_repo)
        if os.path.isabs(source) or source.startswith("."):
            if not os.path.isdir(source):
                raise FileNotFoundError(f"no such model directory {source!r}.")
        if os.path.isdir(source):
            missing = [
                d
                for d in ("unet", "scheduler", "text_encoder", "tokenizer")
                if not os.path.isdir(os.path.join(source, d))
            ]
            if missing:
                raise FileNotFoundError(
                    f"{source!r} lacks the subfolder(s) {missing}; expected the diffusers layout unet/, scheduler/,"
                    " text_encoder/, tokenizer/."
                )
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", revision=revision, torch_dtype=torch_dtype, use_safetensors=True
        )
        config = DDPMScheduler.load_config(source, subfolder="scheduler", revision=revision)
        scheduler_cls = getattr(diffusers, str(config.get("_class_name")), None)
        if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, SchedulerMixin)):
            raise ValueError(
                f"{source!r}/scheduler names an unknown scheduler class {config.get('_class_name')!r}."
            )
        scheduler = scheduler_cls.from_config(config)
        text_encoder, tokenizer = _load_text_encoder(source, revision, torch_dtype, None)
        if device is not None:
            unet.to(device)
            text_encoder.to(device)
        unet.eval()
        model_id, model_revision = _model_id_and_revision(source, revision, id)
        return cls(
            unet,
            scheduler,
            text_encoder,
            tokenizer,
            id=model_id,
            revision=model_revision,
            sampler=sampler,
            eta=eta,
            negative_prompt=negative_prompt,
        )

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler,
            "eta": self.eta,
            "negative_prompt": self.negative_prompt,
            "scheduler": _scheduler_description(self.scheduler),
        }

    def _sampling_scheduler(self) -> Any:
        from diffusers import DDIMScheduler

        if self.sampler == "ddim":
            return DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
        # A fresh copy: schedulers keep per-run state (timesteps, step index).
        return type(self.scheduler).from_config(self.scheduler.config)

    def _max_length(self) -> int | None:
        length = getattr(self.tokenizer, "model_max_length", None)
        if length is None or length > 100_000:
            length = getattr(getattr(self.text_encoder, "config", None), "max_position_embeddings", None)
        return length

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._embeddings))
        if missing:
            encoder = self.text_encoder
            device = next(encoder.parameters()).device
            length = self._max_length()
            tokens = self.tokenizer(
                missing,
                padding="max_length" if length is not None else True,
                max_length=length,
                truncation=length is not None,
                return_tensors="pt",
            )
            kwargs = {}
            if getattr(getattr(encoder, "config", None), "use_attention_mask", False):
                kwargs["attention_mask"] = tokens["attention_mask"].to(device)
            was_training = encoder.training
            encoder.eval()
            try:
                hidden = encoder(tokens["input_ids"].to(device), **kwargs)[0]
            finally:
                encoder.train(was_training)
            for prompt, emb in zip(missing, hidden, strict=True):
                self._embeddings[prompt] = emb.detach()
        return torch.stack([self._embeddings[p] for p in prompts])

    @torch.no_grad()
    def generate(
        self, prompts: list[str], seeds: list[int], *, guidance_scale: float, num_inference_steps: int
    ) -> Tensor:
        unet = self.unet
        param = next(unet.parameters())
        device, dtype = param.device, param.dtype
        channels = int(unet.config.in_channels)
        size = unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        use_cfg = guidance_scale > 1.0
        cond = self._encode(list(prompts))
        if use_cfg:
            uncond = self._encode([self.negative_prompt]).expand(len(prompts), -1, -1)
            cond = torch.cat([uncond, cond])
        cond = cond.to(device=device, dtype=dtype)

        scheduler = self._sampling_scheduler()
        scheduler.set_timesteps(num_inference_steps, device=device)
        generators = _cpu_generators(seeds)
        noise = torch.stack([torch.randn((channels, height, width), generator=g) for g in generators])
        x = (noise * scheduler.init_noise_sigma).to(device=device, dtype=dtype)
        step_params = inspect.signature(scheduler.step).parameters
        step_kwargs: dict[str, Any] = {}
        if "generator" in step_params:
            step_kwargs["generator"] = generators
        if "eta" in step_params:
            step_kwargs["eta"] = self.eta
        if "use_clipped_model_output" in step_params:
            # With clip_sample, re-derive ε from the clipped x̂0: raw ε from an early, very noisy step
            # would otherwise carry the out-of-range prediction into the next sample.
            step_kwargs["use_clipped_model_output"] = True

        was_training = unet.training
        unet.eval()
        try:
            for t in scheduler.timesteps:
                model_input = torch.cat([x, x]) if use_cfg else x
                model_input = scheduler.scale_model_input(model_input, t)
                out = unet(model_input, t, encoder_hidden_states=cond, return_dict=False)[0]
                out = out[:, :channels]  # learned-variance models: the first C channels are ε
                if use_cfg:
                    out_uncond, out_cond = out.chunk(2)
                    out = out_uncond + guidance_scale * (out_cond - out_uncond)
                x = scheduler.step(out, t, x, **step_kwargs, return_dict=False)[0]
        finally:
            unet.train(was_training)
        return ((x.float() + 1) / 2).clamp(0, 1).cpu()

    def __repr__(self) -> str:
        c = self.unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else "x".join(map(str, c.sample_size))
        return (
            f"PixelDiffusionGenerator(id={self.id!r}, revision={self.revision!r}, sampler={self.sampler!r},"
            f" eta={self.eta:g}, channels={c.in_channels}, sample_size={size}, negative_prompt={self.negative_prompt!r})"
        )


# ------------------------------------------------------------------------------------- a callable
class CallableGenerator:
    """A user function ``fn(prompts, generator) -> images`` as a generator.

    ``images``: a float tensor ``(N, C, H, W)`` in ``[0, 1]``, an ``(N, H, W, C)`` array or a list of
    PIL images, one per prompt. With ``batched=True`` (default) ``fn`` gets a whole batch and one
    ``torch.Generator`` seeded from the batch's image seeds, so an image depends on its batch mates
    (fixed for a fixed ``batch_size``); ``batched=False`` calls ``fn`` once per image with that
    image's own seed, so results are independent of batching. The cache trusts ``id`` and
    ``revision``: change one when ``fn`` changes.
    """

    def __init__(
        self,
        fn: Callable[[list[str], torch.Generator], Any],
        *,
        id: str | None = None,
        revision: str | None = None,
        batched: bool = True,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"`fn` must be callable (prompts, generator) -> images; got {type(fn).__name__}.")
        self.fn = fn
        self.id = str(id or getattr(fn, "__qualname__", None) or type(fn).__name__)
        self.revision = revision
        self.batched = bool(batched)
        self._settings = _json_safe(dict(settings or {}))

    @property
    def settings(self) -> dict[str, Any]:
        return {"batched": self.batched, **self._settings}

    def generate(
        self, prompts: list[str], seeds: list[int], *, guidance_scale: float, num_inference_steps: int
    ) -> Tensor:
        del guidance_scale, num_inference_steps  # a plain function has neither; they still key the cache
        if self.batched:
            generator = torch.Generator(device="cpu").manual_seed(
                _derived_seed(int(seeds[0]), f"batch:{seeds}")
            )
            return _to_unit_images(self.fn(list(prompts), generator), len(prompts), f"generator {self.id!r}")
        images = [
            _to_unit_images(self.fn([p], g), 1, f"generator {self.id!r}")
            for p, g in zip(prompts, _cpu_generators(seeds), strict=True)
        ]
        if len({tuple(i.shape) for i in images}) > 1:
            raise ValueError(f"generator {self.id!r} returned images of different shapes.")
        return torch.cat(images)

    def __repr__(self) -> str:
        return f"CallableGenerator(id={self.id!r}, revision={self.revision!r}, batched={self.batched})"


# ------------------------------------------------------------------------------------- the cache
@dataclass(frozen=True)
class _Item:
    label: int
    class_name: str
    shot: int
    prompt: str
    seed: int


def _entry_key(generator_info: Mapping[str, Any], item: _Item, settings: Mapping[str, Any]) -> str:
    material = {
        "cache_format": CACHE_FORMAT_VERSION,
        "generator": generator_info,
        "prompt": item.prompt,
        "seed": item.seed,
        **settings,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:40]
    return slug or "class"


class _Cache:
    """``<dir>/manifest.json`` + ``<dir>/images/<class slug>/<key prefix>.png``, every write atomic."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.root = Path(directory)
        self.manifest_path = self.root / MANIFEST_NAME
        self.entries: dict[str, dict[str, Any]] = {}
        if self.manifest_path.exists():
            try:
                data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
                entries = data["entries"]
                version = data["format_version"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{str(self.manifest_path)!r} is not a synthesis cache manifest ({exc}); use another"
                    " `cache_dir` or delete that file."
                ) from None
            if version != CACHE_FORMAT_VERSION:
                raise ValueError(
                    f"{str(self.manifest_path)!r} has cache format {version}; this version reads"
                    f" {CACHE_FORMAT_VERSION}. Use another `cache_dir`."
                )
            self.entries = dict(entries)

    def path_for(self, key: str, item: _Item) -> Path:
        return self.root / "images" / _slug(item.class_name) / f"{key[:24]}.png"

    def load(self, key: str, channels: int | None) -> Tensor | None:
        """The cached image of ``key``, or None if absent or its file does not match its sha256."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        path = self.root / entry["file"]
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            return None
        shape = entry.get("shape")
        c = channels if channels is not None else (shape[0] if shape else None)
        if c not in _PNG_MODES:
            return None
        try:
            image = _read_png(data, c)
        except Exception:  # noqa: BLE001 - a damaged file is simply regenerated
            return None
        if shape is not None and list(image.shape) != list(shape):
            return None
        return image

    def store(self, records: list[tuple[str, _Item, Tensor, dict[str, Any]]]) -> None:
        """Write the batch's PNGs, then the manifest naming them (a kill in between loses only the batch)."""
        for key, item, image, entry in records:
            data = _png_bytes(image)
            path = self.path_for(key, item)
            atomic_write_bytes(path, data)
            entry.update(
                {
                    "file": path.relative_to(self.root).as_posix(),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "shape": list(image.shape),
                }
            )
            self.entries[key] = entry
        self.save()

    def save(self) -> None:
        atomic_write_json(
            self.manifest_path,
            {"format_version": CACHE_FORMAT_VERSION, "library": "nodata-defense", "entries": self.entries},
        )


# ------------------------------------------------------------------------------------ entry point
def _check_generator(generator: Any) -> None:
    if not hasattr(generator, "generate") or not callable(generator.generate):
        hint = " Wrap a function in CallableGenerator(fn)." if callable(generator) else ""
        raise TypeError(
            "`generator` must be an image generator (DeepFloydIFGenerator, DiffusersText2ImageGenerator,"
            f" PixelDiffusionGenerator, CallableGenerator, or any object with .generate/.id/.revision/.settings);"
            f" got {type(generator).__name__}.{hint}"
        )
    if not isinstance(getattr(generator, "id", None), str) or not generator.id:
        raise TypeError(
            f"`generator.id` must be a non-empty string; got {_short(getattr(generator, 'id', None))}."
        )


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def synthesize(
    class_names: Sequence[str],
    generator: ImageGenerator,
    config: SynthesisConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ReferenceSet:
    """Generate ``config.shots_per_class`` reference images per class (step 1 of the method).

    Args:
        class_names: distinct class names, in label order.
        generator: a back-end of this module (or any :class:`ImageGenerator`).
        config: prompts, shots, seed, guidance (None: 7.0 for one shot, 4.0 for more), steps, output
            size, batch size; default :class:`~nodata_defense.config.SynthesisConfig`.
        cache_dir: if given, each image is saved there as an 8-bit PNG with an entry in
            ``manifest.json`` as soon as its batch finishes; a re-run loads finished images (no
            generator call when all are there), and an entry is regenerated when anything that
            determines it changed or its file does not match its recorded sha256.

    Returns:
        A :class:`ReferenceSet`, class-major (class 0's shots first). Images are CPU float32,
        quantized to 8 bits whether fresh or cached, so both paths give identical sets.
    """
    config = _check_config(config)
    names = check_class_names("class_names", class_names)
    _check_generator(generator)
    prompts = build_prompts(names, config)
    guidance = config.guidance_scale
    if guidance is None:
        guidance = paper_guidance_scale(config.shots_per_class)
    sampling = {
        "guidance_scale": float(guidance),
        "num_inference_steps": int(config.num_inference_steps),
        "image_size": config.image_size,
    }
    generator_info = _json_safe(
        {
            "id": generator.id,
            "revision": getattr(generator, "revision", None),
            "settings": dict(getattr(generator, "settings", {}) or {}),
        }
    )
    items = [
        _Item(label, name, shot, prompts[label][shot], image_seed(config.seed, name, shot))
        for label, name in enumerate(names)
        for shot in range(config.shots_per_class)
    ]
    keys = [_entry_key(generator_info, item, sampling) for item in items]
    cache = _Cache(cache_dir) if cache_dir is not None else None

    images: list[Tensor | None] = [None] * len(items)
    if cache is not None:
        for i, key in enumerate(keys):
            images[i] = cache.load(key, None)
    todo = [i for i, img in enumerate(images) if img is None]
    hits = len(items) - len(todo)

    def finish(indices: list[int], batch: Tensor) -> None:
        if config.image_size is not None:
            batch = _resize_images(batch, config.image_size)
        batch = _quantize(batch)
        records = []
        for j, i in enumerate(indices):
            images[i] = batch[j]
            if cache is not None:
                item = items[i]
                entry = {
                    "class": item.class_name,
                    "label": item.label,
                    "shot": item.shot,
                    "prompt": item.prompt,
                    "seed": item.seed,
                    "generator": generator_info,
                    **sampling,
                }
                records.append((keys[i], item, batch[j], entry))
        if cache is not None:
            cache.store(records)

    def call(indices: list[int]) -> dict[str, Any]:
        return {
            "prompts": [items[i].prompt for i in indices],
            "seeds": [items[i].seed for i in indices],
            "guidance_scale": sampling["guidance_scale"],
            "num_inference_steps": sampling["num_inference_steps"],
        }

    with tqdm(total=len(todo), desc="synthesis", unit="img", disable=not config.show_progress) as bar:
        if todo and config.free_stage_one and isinstance(generator, DeepFloydIFGenerator):
            # All stage-I images first (64 px, small), then free stage I and T5 for stage II.
            stage_one = []
            for indices in _batches(todo, config.batch_size):
                args = call(indices)
                stage_one.append(
                    (indices, generator.generate_stage_one(args.pop("prompts"), args.pop("seeds"), **args))
                )
            generator.free_stage_one()
            for indices, low in stage_one:
                out = generator.generate_stage_two(low)
                finish(indices, _to_unit_images(out, len(indices), f"generator {generator.id!r}"))
                bar.update(len(indices))
        else:
            for indices in _batches(todo, config.batch_size):
                args = call(indices)
                out = generator.generate(args.pop("prompts"), args.pop("seeds"), **args)
                finish(indices, _to_unit_images(out, len(indices), f"generator {generator.id!r}"))
                bar.update(len(indices))

    shapes = {tuple(img.shape) for img in images if img is not None}
    if len(shapes) > 1:
        raise ValueError(
            f"the images have different shapes {sorted(shapes)} (e.g. cached by another model version);"
            " set `config.image_size` or use a fresh `cache_dir`."
        )
    if cache is not None and hits:
        # Labels are per run (the key does not hold them); record the current ones.
        changed = False
        for item, key in zip(items, keys, strict=True):
            if cache.entries[key].get("label") != item.label:
                cache.entries[key]["label"] = item.label
                changed = True
        if changed:
            cache.save()
    metadata = {
        "generator": generator_info,
        **sampling,
        "seed": config.seed,
        "shots_per_class": config.shots_per_class,
        "templates": list(config.templates),
        "class_prompts": dict(config.class_prompts),
        "seeds": [item.seed for item in items],
        "cache": None if cache is None else {"dir": str(cache.root), "hits": hits, "generated": len(todo)},
    }
    return ReferenceSet(
        images=torch.stack([img for img in images if img is not None]),
        labels=torch.tensor([item.label for item in items], dtype=torch.long),
        class_names=names,
        prompts=[item.prompt for item in items],
        metadata=metadata,
    )


# ------------------------------------------------------------------------------- a user's folder
def load_reference_folder(
    root: str | os.PathLike,
    class_names: Sequence[str],
    *,
    channels: int = 3,
    image_size: int | tuple[int, int] | None = None,
    shots_per_class: int | None = None,
    template: str = "This is a photo of a {}",
) -> ReferenceSet:
    """Reference images of a user's own: ``root/<class name>/*.png|jpg|...``, files in sorted order.

    Every class needs a folder with at least one image; any other visible file in it is an error
    (so a typo or a stray file is not silently skipped). Images are converted to ``channels``
    (1: grey, 3: RGB) and, if ``image_size`` is given, resized (an int: shorter side, then a centred
    square crop); without it all images must already have the same size. ``shots_per_class`` keeps
    the first images of each class. ``prompts`` are ``template`` filled with the class name.
    """
    from PIL import Image, UnidentifiedImageError

    names = check_class_names("class_names", class_names)
    if channels not in (1, 3):
        raise ValueError(f"`channels` must be 1 (grey) or 3 (RGB); got {_short(channels)}.")
    if shots_per_class is not None:
        shots_per_class = check_positive_int("shots_per_class", shots_per_class)
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(
            f"`template` must contain exactly one '{{}}' slot for the class name; got {_short(template)}."
        )
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(
            f"`root` must be a directory with one folder per class; {str(base)!r} is not one."
        )
    missing = [n for n in names if not (base / n).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"`root` {str(base)!r} has no folder for class(es) {missing}; expected root/<class name>/ for each class."
        )
    tensors, labels, prompts, files = [], [], [], []
    mode = _PNG_MODES[channels]
    for label, name in enumerate(names):
        folder = base / name
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        others = [p.name for p in entries if p.is_file() and p.suffix.lower() not in IMAGE_EXTENSIONS]
        if others:
            raise ValueError(
                f"{str(folder)!r} holds non-image file(s) {others}; expected only {', '.join(IMAGE_EXTENSIONS)}."
            )
        paths = [p for p in entries if p.is_file()]
        if not paths:
            raise ValueError(f"{str(folder)!r} holds no image; each class needs at least one.")
        if shots_per_class is not None:
            paths = paths[:shots_per_class]
        for path in paths:
            try:
                with Image.open(path) as img:
                    img.load()
                    array = np.array(img.convert(mode))
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise ValueError(f"cannot read image {str(path)!r}: {exc}") from None
            if array.ndim == 2:
                array = array[..., None]
            image = torch.from_numpy(array).permute(2, 0, 1).float().div(255.0).unsqueeze(0)
            if image_size is not None:
                image = _quantize(_resize_images(image, image_size))
            tensors.append(image)
            labels.append(label)
            prompts.append(template.format(name))
            files.append(path.relative_to(base).as_posix())
    shapes = sorted({tuple(t.shape[1:]) for t in tensors})
    if len(shapes) > 1:
        raise ValueError(f"the images have different sizes {shapes}; pass `image_size` to resize them.")
    return ReferenceSet(
        images=torch.cat(tensors),
        labels=torch.tensor(labels, dtype=torch.long),
        class_names=names,
        prompts=prompts,
        metadata={
            "generator": {"id": "folder", "revision": None, "settings": {"root": str(base.resolve())}},
            "image_size": image_size if not isinstance(image_size, tuple) else list(image_size),
            "files": files,
        },
    )
