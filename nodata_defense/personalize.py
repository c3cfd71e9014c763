"""Step 2: the self-personalized denoiser — classifier-guided LoRA fine-tuning (Choi et al., ECCV 2024).

The one-shot denoiser is fine-tuned with LoRA on the synthetic reference images, with the usual
denoising loss plus a small classification term that asks the classifier to recognise the
denoised images:

    x_t  = sqrt(ᾱ_t) (2x − 1) + sqrt(1 − ᾱ_t) ε,        t ~ U{t_low..t_high}, ε ~ N(0, I)
    x̂0  = clip((x_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t), −1, 1)
    loss = MSE(ε̂, ε) + λ · CE(f((x̂0 + 1) / 2), y)

The UNet is conditioned exactly as at inference: one fixed, class-agnostic prompt (the denoiser's
own ``prompt``), IF-II's noise-level input, no guidance. Only the LoRA weights train; the base UNet
and the classifier are frozen and left bit-identical. The adapter is stored in the peft layout
(``adapter_config.json`` + ``adapter_model.safetensors``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._io import atomic_save_safetensors, atomic_write_json
from ._training import LoopSettings, fingerprint, train_loop
from ._validation import _short, check_images
from .classifiers import extract_logits
from .config import PersonalizeConfig
from .denoiser import DiffusionDenoiser, _module_device_dtype, _PixelBridge

ADAPTER_NAME = "personalized"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# Written into the safetensors metadata so a loader can tell which adapter and layout it holds.
_ADAPTER_FORMAT = "nodata-defense/peft-lora/1"


# ------------------------------------------------------------------------------- shared checks
def _check_references(references: Any, name: str = "references") -> tuple[Tensor, Tensor]:
    """(images, labels) of a ReferenceSet-like object: ``.images`` N×C×H×W in [0, 1], ``.labels`` (N,)."""
    if not hasattr(references, "images") or not hasattr(references, "labels"):
        raise TypeError(
            f"`{name}` must be a ReferenceSet (an object with `.images` and `.labels`); got"
            f" {type(references).__name__}."
        )
    images, labels = references.images, references.labels
    if isinstance(images, Tensor) and images.dim() >= 1 and images.shape[0] == 0:
        raise ValueError(f"`{name}` is empty: it holds no images (shape {tuple(images.shape)}).")
    images = check_images(images, f"{name}.images")
    if not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"`{name}.labels` must be a tensor of integer class indices; got {_short(labels)}."
            ) from error
    if torch.is_floating_point(labels) or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"`{name}.labels` must hold integer class indices; got dtype {labels.dtype}.")
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"`{name}.labels` must have shape ({images.shape[0]},), one label per image; got"
            f" {tuple(labels.shape)}."
        )
    if int(labels.min()) < 0:
        raise ValueError(f"`{name}.labels` must be class indices >= 0; got a minimum of {int(labels.min())}.")
    return images, labels.long().cpu()


def _to_module(x: Tensor, module: Any) -> Tensor:
    device, dtype = _module_device_dtype(module)
    if device is None:
        return x
    return x.to(device=device, dtype=dtype if dtype is not None and dtype.is_floating_point else x.dtype)


def _logits(classifier: Callable[[Tensor], Any], x: Tensor) -> Tensor:
    return extract_logits(classifier(_to_module(x, classifier)), x.shape[0])


@contextlib.contextmanager
def _frozen(module: Any, *, train: bool = False) -> Iterator[None]:
    """Mode ``train`` and ``requires_grad=False`` inside the block; every flag restored afterwards."""
    if not isinstance(module, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.train(train)
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        _restore(modes, flags)


def _restore(modes: Sequence[tuple[nn.Module, bool]], flags: Sequence[tuple[Tensor, bool]]) -> None:
    """Put back train/eval modes and ``requires_grad`` flags recorded before a block changed them."""
    for m, training in modes:
        m.training = training
    for p, flag in flags:
        p.requires_grad_(flag)


def _num_classes(classifier: Any, example: Tensor) -> int:
    """The classifier's number of logits: its ``num_classes`` if set, else one forward pass."""
    known = getattr(classifier, "num_classes", None)
    if isinstance(known, int) and not isinstance(known, bool) and known >= 1:
        return known
    with _frozen(classifier), torch.no_grad():
        return int(_logits(classifier, example).shape[1])


def _check_label_range(labels: Tensor, num_classes: int, name: str = "references.labels") -> None:
    high = int(labels.max())
    if high >= num_classes:
        raise ValueError(
            f"`{name}` must lie in [0, {num_classes - 1}] (the classifier returns {num_classes} logits); got"
            f" a maximum of {high}."
        )


def _batch_indices(generator: torch.Generator, num: int, batch_size: int) -> Tensor:
    """A batch without repetition while it fits; larger batches cycle through fresh permutations."""
    rounds = math.ceil(batch_size / num)
    perms = [torch.randperm(num, generator=generator, device=generator.device) for _ in range(rounds)]
    return torch.cat(perms)[:batch_size].cpu()


def _references_digest(images: Tensor, labels: Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(str(tuple(images.shape)).encode())
    for start in range(0, images.shape[0], 64):  # chunks: no full copy of a large set in memory
        digest.update(images[start : start + 64].detach().to("cpu", torch.float32).contiguous().numpy())
    digest.update(labels.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------- LoRA / peft
def _matches(name: str, key: str) -> bool:
    # peft's rule for a list of target names: the full module name or a dotted suffix of it.
    return name == key or name.endswith("." + key)


def _check_targets(module: nn.Module, targets: Sequence[str], what: str) -> list[str]:
    names = [n for n, _ in module.named_modules() if n]
    matched = [n for n in names if any(_matches(n, k) for k in targets)]
    if not matched:
        candidates = sorted(
            {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        )
        raise ValueError(
            f"`target_modules`={list(targets)} match no layer of the {what}; its nn.Linear/nn.Conv2d layers are"
            f" named {candidates[:12]}{' ...' if len(candidates) > 12 else ''}. Set `target_modules` to some of"
            " them (a UNet without attention blocks has no to_q/to_k/to_v: target its convolutions instead)."
        )
    return matched


def _adapter_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, sub in module.named_modules():
        if isinstance(sub, BaseTunerLayer):
            yield name, sub


def _has_adapter(module: nn.Module, adapter_name: str) -> bool:
    return adapter_name in (getattr(module, "peft_config", None) or {})


def _inject_lora(
    module: nn.Module, lora_config: Any, adapter_name: str, seed: int
) -> dict[str, nn.Parameter]:
    """Add a LoRA adapter (seeded init) and return its parameters by name."""
    from peft import inject_adapter_in_model

    if _has_adapter(module, adapter_name):
        raise ValueError(
            f"the model already holds an adapter named {adapter_name!r}; start from a fresh model or pass"
            " another `adapter_name`."
        )
    device = next(module.parameters()).device
    # peft draws the LoRA A init from the global RNG: seed it so a run (and its resume) is reproducible.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        add_adapter = getattr(module, "add_adapter", None)
        if _is_diffusers_peft_model(module) and add_adapter is not None:
            add_adapter(lora_config, adapter_name=adapter_name)
        else:
            inject_adapter_in_model(lora_config, module, adapter_name)
    # New wrapper layers are created in train mode; give them their base layer's mode.
    for _, layer in _adapter_layers(module):
        layer.train(layer.get_base_layer().training)
    try:
        from peft.tuners.tuners_utils import cast_adapter_dtype
    except ImportError:  # older peft: adapters keep the base dtype
        pass
    else:
        # fp16/bf16 base weights: AdamW updates of LoRA weights need float32.
        cast_adapter_dtype(module, adapter_name)
    return _adapter_parameters(module, adapter_name)


def _is_diffusers_peft_model(module: nn.Module) -> bool:
    try:
        from diffusers.loaders.peft import PeftAdapterMixin
    except ImportError:
        return False
    return isinstance(module, PeftAdapterMixin)


def _adapter_parameters(module: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    marker = f".{adapter_name}."
    return {n: p for n, p in module.named_parameters() if "lora_" in n and marker in n}


def _remove_adapter(module: nn.Module, adapter_name: str) -> None:
    """Delete the adapter and unwrap layers left without any, so the model is structurally as before."""
    for _, layer in list(_adapter_layers(module)):
        if adapter_name in layer._get_available_adapters():
            layer.delete_adapter(adapter_name)
    for name, layer in list(_adapter_layers(module)):
        if not layer._get_available_adapters():
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, layer.get_base_layer())
    configs = getattr(module, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(adapter_name, None)
        if not configs:
            del module.peft_config
            if hasattr(module, "_hf_peft_config_loaded"):
                module._hf_peft_config_loaded = False


def _lora_config_dict(lora_config: Any) -> dict[str, Any]:
    """LoraConfig.to_dict() made JSON-clean, marked for inference as peft's save_pretrained does."""
    data = lora_config.to_dict()
    for key, value in list(data.items()):
        if isinstance(value, set):
            data[key] = sorted(value)
        elif hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):
            data[key] = value.value  # enums (peft_type, task_type)
    data["inference_mode"] = True
    return json.loads(json.dumps(data, default=str))


def _make_lora_config(rank: int, alpha: float | None, targets: Sequence[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=list(targets),
        init_lora_weights=True,
    )


def _save_peft_adapter(module: nn.Module, adapter_name: str, directory: str | os.PathLike, kind: str) -> Path:
    from peft import get_peft_model_state_dict

    if not _has_adapter(module, adapter_name):
        raise ValueError(f"the model holds no adapter named {adapter_name!r}; nothing to save.")
    directory = Path(directory)
    state = get_peft_model_state_dict(module, adapter_name=adapter_name)
    metadata = {
        "format": "pt",
        "nodata_defense": _ADAPTER_FORMAT,
        "adapter_name": adapter_name,
        "model": kind,
    }
    atomic_save_safetensors(directory / ADAPTER_WEIGHTS_FILE, state, metadata=metadata)
    atomic_write_json(directory / ADAPTER_CONFIG_FILE, _lora_config_dict(module.peft_config[adapter_name]))
    return directory


def _load_peft_adapter(module: nn.Module, directory: str | os.PathLike, adapter_name: str | None) -> str:
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG_FILE, directory / ADAPTER_WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"no adapter file {str(path)!r}: `directory` must hold {path.name}.")
    with safe_open(str(weights_path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if adapter_name is None:
        adapter_name = metadata.get("adapter_name", ADAPTER_NAME)
    lora_config = LoraConfig.from_pretrained(str(directory))
    peft_type = getattr(lora_config.peft_type, "value", lora_config.peft_type)
    if peft_type is not None and str(peft_type) != "LORA":
        raise ValueError(
            f"{str(config_path)!r} is not a LoRA adapter config (peft_type={lora_config.peft_type})."
        )
    state = load_file(str(weights_path))
    _check_targets(module, sorted(lora_config.target_modules), "model the adapter is loaded into")
    params = _inject_lora(module, lora_config, adapter_name, seed=0)
    try:
        result = set_peft_model_state_dict(module, state, adapter_name=adapter_name)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        expected = set(_adapter_state_keys(module, adapter_name))
        if unexpected or expected != set(state):
            missing = sorted(expected - set(state))
            raise ValueError(
                f"the adapter in {str(directory)!r} does not fit this model: missing {missing[:3]}, unexpected"
                f" {sorted(set(unexpected) | (set(state) - expected))[:3]} (was it saved from another model?)."
            )
    except BaseException:
        _remove_adapter(module, adapter_name)
        raise
    for p in params.values():
        p.requires_grad_(False)
    return adapter_name


def _adapter_state_keys(module: nn.Module, adapter_name: str) -> list[str]:
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(module, adapter_name=adapter_name))


# -------------------------------------------------------------------------------------- training
def _training_draws(
    generator: torch.Generator,
    num_references: int,
    batch_size: int,
    timestep_range: tuple[int, int],
    sample_shape: Sequence[int],
) -> tuple[Tensor, Tensor, Tensor]:
    """(reference indices, timesteps, ε) of one step, drawn in this order from ``generator``."""
    indices = _batch_indices(generator, num_references, batch_size)
    low, high = timestep_range
    timesteps = torch.randint(low, high + 1, (batch_size,), generator=generator, device=generator.device)
    noise = torch.randn(
        (batch_size, *sample_shape), generator=generator, device=generator.device, dtype=torch.float32
    )
    return indices, timesteps, noise


class _StepResult:
    """Base of the results of the training steps (personalize, adapt)."""

    loss_history: list[dict[str, float]]

    @property
    def final_loss(self) -> float:
        return self.loss_history[-1]["loss"] if self.loss_history else float("nan")


@dataclass(frozen=True, repr=False)
class PersonalizationResult(_StepResult):
    """Outcome of :func:`personalize`: the denoiser now holds the trained LoRA adapter ``adapter_name``."""

    adapter_name: str
    lora_config: dict[str, Any]
    config: PersonalizeConfig
    steps: int
    lora_parameters: int
    adapted_modules: tuple[str, ...]
    loss_history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int = 0

    def __repr__(self) -> str:
        c = self.config
        return (
            f"PersonalizationResult(adapter_name={self.adapter_name!r}, steps={self.steps},"
            f" lora_rank={c.lora_rank}, lora_alpha={self.lora_config.get('lora_alpha')},"
            f" target_modules={c.target_modules}, classifier_weight={c.classifier_weight:g},"
            f" learning_rate={c.learning_rate:g}, batch_size={c.batch_size},"
            f" lora_parameters={self.lora_parameters}, adapted_modules={len(self.adapted_modules)},"
            f" final_loss={self.final_loss:.4g}, resumed_from_step={self.resumed_from_step})"
        )


def _as_config(config: Any, cls: type) -> Any:
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    if isinstance(config, Mapping):
        return cls.model_validate(dict(config))
    raise TypeError(
        f"`config` must be a {cls.__name__} (or a dict of its fields); got {type(config).__name__}."
    )


def _loop_settings(config: Any, steps: int, description: str, **extra: Any) -> LoopSettings:
    """The training loop's settings from a step's config (PersonalizeConfig or AdaptConfig)."""
    return LoopSettings(
        steps=steps,
        learning_rate=config.learning_rate,
        seed=config.seed,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        max_grad_norm=config.max_grad_norm,
        schedule="cosine",
        checkpoint_every=config.checkpoint_every,
        show_progress=config.show_progress,
        description=description,
        **extra,
    )


def _run_id(step: str, config: Any, images: Tensor, labels: Tensor, denoiser: Any, **extra: Any) -> str:
    """What identifies a run of a training step, so that a checkpoint of another run is refused.

    ``show_progress`` and ``checkpoint_every`` are left out: they do not change the result.
    """
    return fingerprint(
        {
            "step": step,
            "config": config.model_dump(mode="json", exclude={"show_progress", "checkpoint_every"}),
            "references": _references_digest(images, labels),
            "denoiser": repr(denoiser),
            **extra,
        }
    )


def personalize(
    denoiser: DiffusionDenoiser,
    classifier: Callable[[Tensor], Any] | None,
    references: Any,
    config: PersonalizeConfig | Mapping[str, Any] | None = None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    adapter_name: str = ADAPTER_NAME,
) -> PersonalizationResult:
    """Fine-tune a LoRA adapter of ``denoiser.unet`` on ``references`` (step 2 of the method).

    Args:
        denoiser: the one-shot denoiser; it is modified in place: it gains the (active) adapter
            ``adapter_name``. Its base weights are not changed.
        classifier: ``[0, 1] images → logits`` (any module returning logits, e.g. an
            :class:`~nodata_defense.classifiers.ImageClassifier`); frozen and left unchanged. May be
            ``None`` when ``config.classifier_weight`` is 0.
        references: a :class:`~nodata_defense.synthesis.ReferenceSet` (``.images`` N×C×H×W in
            [0, 1], ``.labels`` class indices of the classifier).
        config: :class:`~nodata_defense.config.PersonalizeConfig` (paper defaults when ``None``).
        checkpoint_dir: if set, a checkpoint is written there every ``config.checkpoint_every`` steps
            and a re-run of the same call resumes from it.
    """
    config = _as_config(config, PersonalizeConfig)
    if not isinstance(denoiser, DiffusionDenoiser):
        raise TypeError(f"`denoiser` must be a DiffusionDenoiser; got {type(denoiser).__name__}.")
    if denoiser.kind == "class_conditional":
        raise ValueError(
            "`denoiser` is class-conditional: it needs the true label at inference, which certification does"
            " not have; personalize an unconditional or text-conditioned denoiser."
        )
    if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
        raise ValueError(f"`adapter_name` must be a Python identifier; got {_short(adapter_name)}.")
    weight = float(config.classifier_weight)
    if weight > 0 and not callable(classifier):
        raise TypeError(
            f"`classifier` must be callable (images → logits) when classifier_weight={weight:g} > 0; got"
            f" {type(classifier).__name__}."
        )
    images, labels = _check_references(references)
    if weight > 0:
        _check_label_range(labels, _num_classes(classifier, images[:1]))

    num_timesteps = denoiser.num_train_timesteps
    t_range = config.timestep_range or (0, num_timesteps - 1)
    if t_range[1] >= num_timesteps:
        raise ValueError(
            f"`timestep_range`={tuple(t_range)} must lie in [0, {num_timesteps - 1}] (the schedule has"
            f" {num_timesteps} steps)."
        )
    bridge = _PixelBridge(
        denoiser, images.shape[1], (images.shape[-2], images.shape[-1]), "references.images"
    )
    unet = denoiser.unet
    adapted = _check_targets(unet, config.target_modules, "denoiser's UNet")
    lora_config = _make_lora_config(config.lora_rank, config.lora_alpha, config.target_modules)

    dtype, device = denoiser.dtype, denoiser.device
    sample_shape = bridge.to_unet(images[:1].to(device=device, dtype=dtype)).shape[1:]
    alphas = denoiser.alphas_cumprod.to(device=device, dtype=torch.float64)

    def compute_loss(generator: torch.Generator) -> dict[str, Tensor]:
        index, t, eps = _training_draws(generator, images.shape[0], config.batch_size, t_range, sample_shape)
        x = bridge.to_unet(images[index].to(device=device, dtype=dtype))
        t, eps = t.to(device), eps.to(device=device, dtype=dtype)
        s0 = alphas[t].sqrt().to(dtype).view(-1, 1, 1, 1)
        s1 = (1.0 - alphas[t]).sqrt().to(dtype).view(-1, 1, 1, 1)
        x0 = denoiser.to_model_space(x)
        x_t = s0 * x0 + s1 * eps
        eps_hat = denoiser.predict_epsilon(x_t, t)
        x0_hat = (x_t - s1 * eps_hat) / s0
        # The loss of the model's own parametrization (ε for IF and DDPM): the objective it was trained on.
        if denoiser.prediction_type == "epsilon":
            mse = F.mse_loss(eps_hat.float(), eps.float())
        elif denoiser.prediction_type == "v_prediction":
            mse = F.mse_loss((s0 * eps_hat - s1 * x0_hat).float(), (s0 * eps - s1 * x0).float())
        else:
            mse = F.mse_loss(x0_hat.float(), x0.float())
        terms = {"loss": mse, "mse": mse}
        if weight > 0:
            denoised = bridge.back(denoiser.to_pixel_space(x0_hat.clamp(-1.0, 1.0)))
            logits = _logits(classifier, denoised)
            ce = F.cross_entropy(logits.float(), labels[index].to(logits.device))
            terms["ce"] = ce
            terms["loss"] = mse + weight * ce
        return terms

    settings = _loop_settings(
        config, config.steps, "personalize denoiser", gradient_accumulation=config.gradient_accumulation
    )
    run_id = _run_id("personalize", config, images, labels, denoiser, adapter_name=adapter_name)

    unet_flags = [(p, p.requires_grad) for p in unet.parameters()]
    trainable = _inject_lora(unet, lora_config, adapter_name, config.seed)
    unet_modes = [(m, m.training) for m in denoiser.modules()]
    try:
        for p in unet.parameters():
            p.requires_grad_(False)
        for p in trainable.values():
            p.requires_grad_(True)
        denoiser.train()
        with _frozen(classifier) if weight > 0 else contextlib.nullcontext():
            outcome = train_loop(
                trainable, compute_loss, settings, checkpoint_dir=checkpoint_dir, run_id=run_id
            )
    except BaseException:
        _remove_adapter(unet, adapter_name)
        raise
    finally:
        _restore(unet_modes, unet_flags)
    for p in trainable.values():
        p.requires_grad_(False)  # the adapter is part of a frozen inference model from here on
    return PersonalizationResult(
        adapter_name=adapter_name,
        lora_config=_lora_config_dict(unet.peft_config[adapter_name]),
        config=config.model_copy(deep=True),
        steps=config.steps,
        lora_parameters=sum(p.numel() for p in trainable.values()),
        adapted_modules=tuple(adapted),
        loss_history=list(outcome.loss_history),
        resumed_from_step=outcome.resumed_from_step,
    )


# ------------------------------------------------------------------------------------- save / load
def save_denoiser_adapter(
    denoiser: DiffusionDenoiser, directory: str | os.PathLike, *, adapter_name: str = ADAPTER_NAME
) -> Path:
    """Write the denoiser's LoRA adapter to ``directory`` in the peft layout (atomic writes).

    ``adapter_config.json`` is the ``LoraConfig`` (as peft's ``save_pretrained`` writes it) and
    ``adapter_model.safetensors`` holds ``peft.get_peft_model_state_dict(unet)``: the keys diffusers'
    ``unet.load_lora_adapter(directory, weight_name="adapter_model.safetensors", prefix=None)`` reads.
    """
    if not isinstance(denoiser, DiffusionDenoiser):
        raise TypeError(f"`denoiser` must be a DiffusionDenoiser; got {type(denoiser).__name__}.")
    return _save_peft_adapter(denoiser.unet, adapter_name, directory, kind=f"denoiser:{denoiser.kind}")


def load_denoiser_adapter(
    denoiser: DiffusionDenoiser, directory: str | os.PathLike, *, adapter_name: str | None = None
) -> str:
    """Add the LoRA adapter saved in ``directory`` to ``denoiser.unet`` (in place) and activate it.

    Reads safetensors only. Returns the adapter's name (the saved one unless ``adapter_name`` is given).
    """
    if not isinstance(denoiser, DiffusionDenoiser):
        raise TypeError(f"`denoiser` must be a DiffusionDenoiser; got {type(denoiser).__name__}.")
    return _load_peft_adapter(denoiser.unet, directory, adapter_name)


__all__ = [
    "ADAPTER_NAME",
    "PersonalizationResult",
    "load_denoiser_adapter",
    "personalize",
    "save_denoiser_adapter",
]
