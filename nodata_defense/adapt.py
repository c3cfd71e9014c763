"""Step 3: adapt the classifier to the denoiser's outputs (Choi et al., ECCV 2024).

The denoiser's one-shot outputs are slightly blurred versions of natural images; the classifier
is fine-tuned on *denoised* synthetic references so that it recognises them, with a tiny learning
rate so that it keeps what it knows:

    x_noisy = x + σ·n,  n ~ N(0, I)   (σ fixed, or per image uniform in ``sigma_range``)
    x̂      = denoiser(x_noisy, σ)     (frozen, no gradient; fresh noise every step)
    loss    = CE(f(x̂), y)

Modes: ``full`` (every parameter), ``lora`` (peft LoRA on the Linear/Conv2d layers), ``head`` (the
last linear layer) and ``none``. The user's classifier is never modified: training happens on a
deep copy, which the result holds.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from ._io import atomic_save_safetensors, atomic_write_json
from ._training import train_loop
from ._validation import _short, check_positive_float
from .config import AdaptConfig
from .denoiser import DiffusionDenoiser, _PixelBridge
from .personalize import (
    _adapter_parameters,
    _as_config,
    _batch_indices,
    _check_label_range,
    _check_references,
    _check_targets,
    _frozen,
    _inject_lora,
    _load_peft_adapter,
    _logits,
    _loop_settings,
    _lora_config_dict,
    _make_lora_config,
    _num_classes,
    _restore,
    _run_id,
    _save_peft_adapter,
    _StepResult,
)

MODES = ("full", "lora", "head", "none")
CLASSIFIER_ADAPTER_NAME = "classifier"
CLASSIFIER_ADAPTER_FILE = "classifier_adapter.safetensors"
CLASSIFIER_ADAPTER_JSON = "classifier_adapter.json"
_FORMAT_VERSION = 1


@dataclass(frozen=True, repr=False)
class AdaptationResult(_StepResult):
    """Outcome of :func:`adapt_classifier`; ``classifier`` is a new module (the input is untouched)."""

    classifier: nn.Module
    mode: str
    config: AdaptConfig
    steps: int
    trainable_parameters: int
    head_module: str | None = None
    adapter_name: str | None = None
    lora_config: dict[str, Any] | None = None
    loss_history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int = 0

    def __repr__(self) -> str:
        c = self.config
        extra = f", head_module={self.head_module!r}" if self.head_module else ""
        if self.lora_config is not None:
            extra += f", lora_rank={c.lora_rank}, lora_alpha={self.lora_config.get('lora_alpha')}"
        return (
            f"AdaptationResult(mode={self.mode!r}, steps={self.steps}, learning_rate={c.learning_rate:g},"
            f" epochs={c.epochs}, batch_size={c.batch_size}, sigma_range={c.sigma_range},"
            f" train_mode={c.train_mode}, trainable_parameters={self.trainable_parameters}{extra},"
            f" final_loss={self.final_loss:.4g}, classifier={type(self.classifier).__name__})"
        )


# ------------------------------------------------------------------------------- what to train
def _find_head(model: nn.Module, num_classes: int) -> str:
    """The last nn.Linear producing ``num_classes`` outputs, else the last nn.Linear."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    if not linears:
        raise ValueError(
            f"mode='head' found no nn.Linear layer in the {type(model).__name__}; name the layer to train"
            " with `head_module`, or use mode='full' or 'lora'."
        )
    exact = [n for n, m in linears if m.out_features == num_classes]
    return exact[-1] if exact else linears[-1][0]


def _default_lora_targets(model: nn.Module) -> list[str]:
    # Grouped (depthwise) convolutions are left out: LoRA's low-rank update assumes a dense kernel.
    return [
        n
        for n, m in model.named_modules()
        if n and (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))
    ]


def _check_head_reaches_logits(model: nn.Module, head: str, example: Tensor) -> None:
    params = list(model.get_submodule(head).parameters())
    with torch.enable_grad():
        logits = _logits(model, example)
        grads = (
            torch.autograd.grad(logits.float().sum(), params, allow_unused=True)
            if logits.requires_grad
            else []
        )
    if all(g is None for g in grads):
        raise ValueError(
            f"the head layer {head!r} does not influence the classifier's logits (e.g. the text projection of a"
            " CLIP zero-shot classifier); set `head_module` to the layer that produces them, or use mode='full'"
            " or 'lora'."
        )


# ------------------------------------------------------------------------------------- training
def _denoise(
    denoiser: DiffusionDenoiser, bridge: _PixelBridge, x_noisy: Tensor, sigmas: Tensor | float, chunk: int
) -> Tensor:
    """One-shot denoising, in chunks; per-image σ goes through the same steps as ``denoiser.forward``."""
    outputs = []
    for start in range(0, x_noisy.shape[0], chunk):
        part = x_noisy[start : start + chunk]
        if isinstance(sigmas, float):
            outputs.append(denoiser(part, sigmas))
            continue
        t_star = [denoiser.timestep_for_sigma(float(s)) for s in sigmas[start : start + chunk]]
        t = torch.tensor(t_star, dtype=torch.long, device=denoiser.device)
        s0 = denoiser.alphas_cumprod.to(device=t.device, dtype=torch.float64)[t].sqrt()
        x = bridge.to_unet(part.to(device=denoiser.device, dtype=denoiser.dtype))
        x_t = s0.to(x.dtype).view(-1, 1, 1, 1) * denoiser.to_model_space(x)
        outputs.append(bridge.back(denoiser.to_pixel_space(denoiser.predict_x0(x_t, t))))
    return torch.cat(outputs)


def adapt_classifier(
    classifier: nn.Module,
    denoiser: DiffusionDenoiser,
    references: Any,
    sigma: float,
    config: AdaptConfig | Mapping[str, Any] | None = None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
) -> AdaptationResult:
    """Fine-tune a copy of ``classifier`` on denoised noisy ``references`` (step 3 of the method).

    Args:
        classifier: ``[0, 1] images → logits`` module; never modified (a deep copy is trained).
        denoiser: the (personalized) denoiser; frozen, used without gradient.
        references: a ReferenceSet (``.images`` N×C×H×W in [0, 1], ``.labels`` class indices).
        sigma: the noise level of use (in [0, 1] pixel space); ignored for the noise when
            ``config.sigma_range`` is set, but still checked.
        config: :class:`~nodata_defense.config.AdaptConfig` (paper defaults when ``None``).
        checkpoint_dir: if set, checkpoints every ``config.checkpoint_every`` steps; re-running the
            same call resumes from the last one.
    """
    config = _as_config(config, AdaptConfig)
    if not isinstance(classifier, nn.Module):
        raise TypeError(
            f"`classifier` must be a torch.nn.Module returning logits (e.g. from as_image_classifier); got"
            f" {type(classifier).__name__}."
        )
    if not isinstance(denoiser, DiffusionDenoiser):
        raise TypeError(f"`denoiser` must be a DiffusionDenoiser; got {type(denoiser).__name__}.")
    sigma = check_positive_float("sigma", sigma)
    denoiser.timestep_for_sigma(sigma)  # refuses a σ beyond the schedule
    if config.sigma_range is not None:
        denoiser.timestep_for_sigma(config.sigma_range[1])
    images, labels = _check_references(references)
    num_classes = _num_classes(classifier, images[:1])
    _check_label_range(labels, num_classes)
    bridge = _PixelBridge(
        denoiser, images.shape[1], (images.shape[-2], images.shape[-1]), "references.images"
    )

    adapted = copy.deepcopy(classifier)
    mode = config.mode
    if mode == "none":
        return AdaptationResult(
            classifier=adapted,
            mode=mode,
            config=config.model_copy(deep=True),
            steps=0,
            trainable_parameters=0,
        )

    flags = [(p, p.requires_grad) for p in adapted.parameters()]
    head = adapter_name = lora_cfg = None
    if mode == "full":
        trainable = {n: p for n, p in adapted.named_parameters() if p.is_floating_point()}
    elif mode == "head":
        head = config.head_module or _find_head(adapted, num_classes)
        try:
            module = adapted.get_submodule(head)
        except AttributeError as error:
            raise ValueError(
                f"`head_module`={head!r} is not a submodule of the {type(adapted).__name__}."
            ) from error
        trainable = {f"{head}.{n}": p for n, p in module.named_parameters()}
        if not trainable:
            raise ValueError(f"`head_module`={head!r} has no parameters to train.")
        with _frozen(adapted):
            for p in trainable.values():
                p.requires_grad_(True)
            _check_head_reaches_logits(adapted, head, images[:1])
    else:  # lora
        targets = config.lora_target_modules or _default_lora_targets(adapted)
        if not targets:
            raise ValueError(
                f"mode='lora' found no nn.Linear / nn.Conv2d layer in the {type(adapted).__name__}; set"
                " `lora_target_modules` or use mode='full'."
            )
        _check_targets(adapted, targets, "classifier")
        adapter_name = CLASSIFIER_ADAPTER_NAME
        lora_cfg = _make_lora_config(config.lora_rank, config.lora_alpha, targets)
        trainable = _inject_lora(adapted, lora_cfg, adapter_name, config.seed)
    for p in adapted.parameters():
        p.requires_grad_(False)
    for p in trainable.values():
        p.requires_grad_(True)

    n = images.shape[0]
    batch = min(config.batch_size, n)
    steps = config.epochs * math.ceil(n / batch)
    dev = denoiser.device

    def compute_loss(generator: torch.Generator) -> dict[str, Tensor]:
        index = _batch_indices(generator, n, batch)
        noise = torch.randn((batch, *images.shape[1:]), generator=generator, device=generator.device)
        if config.sigma_range is not None:
            low, high = config.sigma_range
            u = torch.rand(batch, generator=generator, device=generator.device, dtype=torch.float64)
            sigmas: Tensor | float = (low + (high - low) * u).cpu()
            scale = sigmas.to(device=dev, dtype=torch.float32).view(-1, 1, 1, 1)
        else:
            sigmas = scale = sigma
        x_noisy = images[index].to(dev) + scale * noise.to(dev)
        with torch.no_grad():
            denoised = _denoise(denoiser, bridge, x_noisy, sigmas, config.denoise_batch_size)
        logits = _logits(adapted, denoised)
        loss = F.cross_entropy(logits.float(), labels[index].to(logits.device))
        return {"loss": loss, "ce": loss}

    settings = _loop_settings(config, steps, f"adapt classifier ({mode})")
    run_id = _run_id(
        "adapt",
        config,
        images,
        labels,
        denoiser,
        sigma=sigma,
        head=head,
        classifier=type(classifier).__name__,
    )
    modes = [(m, m.training) for m in adapted.modules()]
    adapted.train(config.train_mode)
    try:
        with _frozen(denoiser):
            outcome = train_loop(
                trainable, compute_loss, settings, checkpoint_dir=checkpoint_dir, run_id=run_id
            )
    finally:
        _restore(modes, flags)
        if adapter_name is not None:
            for p in _adapter_parameters(adapted, adapter_name).values():
                p.requires_grad_(False)
    return AdaptationResult(
        classifier=adapted,
        mode=mode,
        config=config.model_copy(deep=True),
        steps=steps,
        trainable_parameters=sum(p.numel() for p in trainable.values()),
        head_module=head,
        adapter_name=adapter_name,
        lora_config=_lora_config_dict(adapted.peft_config[adapter_name]) if adapter_name else None,
        loss_history=list(outcome.loss_history),
        resumed_from_step=outcome.resumed_from_step,
    )


# ------------------------------------------------------------------------------------- save / load
def save_classifier_adapter(
    adapted: AdaptationResult | nn.Module,
    directory: str | os.PathLike,
    mode: str | None = None,
    *,
    head_module: str | None = None,
) -> Path:
    """Write what adaptation changed to ``directory`` (atomic writes; safetensors only).

    ``classifier_adapter.json`` records the mode (written last, for every mode). Weights:
    ``full`` → the whole adapted state dict and ``head`` → the head layer's tensors, both in
    ``classifier_adapter.safetensors``; ``lora`` → the peft layout (``adapter_config.json`` +
    ``adapter_model.safetensors``); ``none`` → no weights. With a plain module, pass ``mode`` (and
    ``head_module`` for ``head``).
    """
    if isinstance(adapted, AdaptationResult):
        if mode is not None and mode != adapted.mode:
            raise ValueError(f"`mode`={mode!r} contradicts the result's mode {adapted.mode!r}; omit `mode`.")
        model, mode, head_module = adapted.classifier, adapted.mode, adapted.head_module
        adapter_name = adapted.adapter_name
    elif isinstance(adapted, nn.Module):
        model, adapter_name = adapted, CLASSIFIER_ADAPTER_NAME
    else:
        raise TypeError(
            f"`adapted` must be an AdaptationResult or a torch.nn.Module; got {type(adapted).__name__}."
        )
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}; got {_short(mode)}.")
    directory = Path(directory)
    record: dict[str, Any] = {
        "format_version": _FORMAT_VERSION,
        "mode": mode,
        "classifier": type(model).__name__,
    }
    if mode == "full":
        atomic_save_safetensors(
            directory / CLASSIFIER_ADAPTER_FILE, model.state_dict(), metadata={"format": "pt"}
        )
    elif mode == "head":
        if not head_module:
            raise ValueError("mode='head' needs `head_module`, the name of the trained layer.")
        tensors = {f"{head_module}.{k}": v for k, v in model.get_submodule(head_module).state_dict().items()}
        atomic_save_safetensors(directory / CLASSIFIER_ADAPTER_FILE, tensors, metadata={"format": "pt"})
        record["head_module"] = head_module
    elif mode == "lora":
        _save_peft_adapter(model, adapter_name or CLASSIFIER_ADAPTER_NAME, directory, kind="classifier")
        record["adapter_name"] = adapter_name or CLASSIFIER_ADAPTER_NAME
    else:
        directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / CLASSIFIER_ADAPTER_JSON, record)
    return directory


def load_classifier_adapter(classifier: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Apply a saved adaptation to a deep copy of the base ``classifier`` and return the copy."""
    if not isinstance(classifier, nn.Module):
        raise TypeError(f"`classifier` must be a torch.nn.Module; got {type(classifier).__name__}.")
    directory = Path(directory)
    record_path = directory / CLASSIFIER_ADAPTER_JSON
    if not record_path.is_file():
        raise FileNotFoundError(
            f"no {CLASSIFIER_ADAPTER_JSON} in {str(directory)!r}: not a saved classifier adapter."
        )
    record = json.loads(record_path.read_text(encoding="utf-8"))
    mode = record.get("mode")
    if record.get("format_version") != _FORMAT_VERSION or mode not in MODES:
        raise ValueError(
            f"{str(record_path)!r} has format_version={record.get('format_version')!r}, mode={mode!r}; this version"
            f" reads format_version {_FORMAT_VERSION} with a mode in {MODES}."
        )
    model = copy.deepcopy(classifier)
    if mode in ("full", "head"):
        tensors = load_file(str(directory / CLASSIFIER_ADAPTER_FILE))
        target = model if mode == "full" else model.get_submodule(record["head_module"])
        prefix = "" if mode == "full" else record["head_module"] + "."
        local = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        expected = set(target.state_dict())
        if set(local) != expected or len(local) != len(tensors):
            raise ValueError(
                f"the saved {mode} weights in {str(directory)!r} do not fit this classifier: missing"
                f" {sorted(expected - set(local))[:3]}, unexpected {sorted(set(local) - expected)[:3]}."
            )
        try:
            target.load_state_dict(local, strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"the saved {mode} weights in {str(directory)!r} do not fit this classifier: {error}"
            ) from error
    elif mode == "lora":
        _load_peft_adapter(model, directory, record.get("adapter_name"))
    return model


__all__ = [
    "MODES",
    "AdaptationResult",
    "adapt_classifier",
    "load_classifier_adapter",
    "save_classifier_adapter",
]
