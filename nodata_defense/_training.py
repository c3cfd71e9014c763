"""The one small training loop shared by personalization (step 2) and adaptation (step 3).

It owns what both steps need and neither should write twice: seeding, the learning-rate schedule,
gradient accumulation and clipping, autocast on CUDA, atomic checkpoints and exact resume, the
progress bar and the loss history.

Exact resume: every random draw of step ``k`` comes from a generator seeded by ``(seed, k)``, the
global RNG is forked and re-seeded the same way (for dropout), and the learning rate is a pure
function of the step. So model + optimizer state at step ``k`` is the whole state, and a run that is
stopped and resumed ends bit-identical to one that never stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._io import atomic_save_safetensors, atomic_write_json

_LATEST = "latest.json"


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs to know; each step's pydantic config maps onto it."""

    steps: int
    learning_rate: float
    seed: int
    weight_decay: float = 0.0
    warmup_steps: int = 0
    gradient_accumulation: int = 1
    max_grad_norm: float | None = 1.0
    schedule: str = "cosine"  # "cosine" or "constant"
    checkpoint_every: int = 100
    show_progress: bool = False
    description: str = "training"


@dataclass(frozen=True)
class TrainingResult:
    """Loss history of a finished run (one entry per optimizer step, each a dict of named terms)."""

    loss_history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int = 0

    @property
    def final_loss(self) -> float:
        return self.loss_history[-1]["loss"] if self.loss_history else float("nan")


def learning_rate_at(step: int, settings: LoopSettings) -> float:
    """Linear warm-up then cosine decay to 0 (or constant) — a pure function of the step."""
    if settings.warmup_steps and step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    if settings.schedule == "constant":
        return settings.learning_rate
    span = max(1, settings.steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    return settings.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_seed(seed: int, step: int, micro_step: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{micro_step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def fingerprint(obj: object) -> str:
    """A stable hash of a JSON-able description of the run (to refuse resuming a different run)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _autocast(device: torch.device):
    # bf16 autocast on CUDA only: it needs no gradient scaler; CPU runs stay in full precision.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, float]] = {}
    for index, slot in state["state"].items():
        for key, value in slot.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, scalars


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor], scalars: dict) -> None:
    state = optimizer.state_dict()
    slots: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        slots.setdefault(int(index), {})[key] = value
    for index, values in scalars.items():
        slots.setdefault(int(index), {}).update(values)
    state["state"] = slots
    optimizer.load_state_dict(state)


def _save_checkpoint(
    directory: Path,
    step: int,
    trainable: Mapping[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    history: list[dict[str, float]],
    run_id: str,
) -> None:
    final = directory / f"checkpoint-{step:07d}"
    staging = directory / f".checkpoint-{step:07d}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    atomic_save_safetensors(staging / "trainable.safetensors", {k: p.data for k, p in trainable.items()})
    opt_tensors, opt_scalars = _optimizer_tensors(optimizer)
    atomic_save_safetensors(staging / "optimizer.safetensors", opt_tensors)
    atomic_write_json(
        staging / "state.json",
        {"step": step, "run_id": run_id, "optimizer_scalars": opt_scalars, "loss_history": history},
    )
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    # The pointer moves only once the new checkpoint is complete; older ones are then removed.
    atomic_write_json(directory / _LATEST, {"checkpoint": final.name, "step": step, "run_id": run_id})
    for old in directory.glob("checkpoint-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(
    directory: Path,
    trainable: Mapping[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    run_id: str,
) -> tuple[int, list[dict[str, float]]]:
    pointer = directory / _LATEST
    if not pointer.exists():
        return 0, []
    latest = json.loads(pointer.read_text())
    if latest.get("run_id") != run_id:
        raise ValueError(
            f"`checkpoint_dir` {str(directory)!r} holds a checkpoint of a different run "
            f"(run id {latest.get('run_id')!r}, expected {run_id!r}); remove it or choose another directory."
        )
    path = directory / latest["checkpoint"]
    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    missing = set(trainable) ^ set(weights)
    if missing:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the trainable parameters: {sorted(missing)[:5]}"
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name].to(device=param.device, dtype=param.dtype))
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    device = next(iter(trainable.values())).device
    _load_optimizer(optimizer, {k: v.to(device) for k, v in opt_tensors.items()}, state["optimizer_scalars"])
    return int(state["step"]), list(state["loss_history"])


def train_loop(
    trainable: Mapping[str, nn.Parameter],
    compute_loss: Callable[[torch.Generator], dict[str, Tensor]],
    settings: LoopSettings,
    *,
    checkpoint_dir: str | Path | None = None,
    run_id: str = "",
) -> TrainingResult:
    """Minimise ``compute_loss(generator)["loss"]`` over the ``trainable`` parameters with AdamW.

    ``compute_loss`` draws every random number it needs (batch indices, timesteps, noise) from the
    generator it is given, which is seeded by ``(settings.seed, step, micro_step)``; it returns a
    dict of named scalar terms including ``"loss"``. With ``checkpoint_dir`` set, a checkpoint is
    written atomically every ``settings.checkpoint_every`` steps and at the end, and a re-run with
    the same ``run_id`` resumes from the last one. Models' train/eval modes are the caller's.
    """
    params = list(trainable.values())
    if not params:
        raise ValueError("`trainable` is empty: nothing to train.")
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start, history = (0, [])
    if directory is not None:
        start, history = _load_checkpoint(directory, trainable, optimizer, run_id)

    bar = tqdm(
        total=settings.steps,
        initial=start,
        desc=settings.description,
        disable=not settings.show_progress,
        leave=False,
    )
    for step in range(start, settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, settings)
        totals: dict[str, float] = {}
        for micro in range(settings.gradient_accumulation):
            seed = step_seed(settings.seed, step, micro)
            generator = torch.Generator(device=device).manual_seed(seed)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                with _autocast(device):
                    terms = compute_loss(generator)
                (terms["loss"] / settings.gradient_accumulation).backward()
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach()) / settings.gradient_accumulation
        if settings.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(totals)
        bar.update(1)
        bar.set_postfix(loss=f"{totals['loss']:.4f}")
        done = step + 1
        if directory is not None and (done % settings.checkpoint_every == 0 or done == settings.steps):
            _save_checkpoint(directory, done, trainable, optimizer, history, run_id)
    bar.close()
    return TrainingResult(loss_history=history, resumed_from_step=start)
