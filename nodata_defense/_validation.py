"""Argument checks shared by every public entry point.

Every error names the argument, the value received and what was expected, so a user can fix the
call without reading the source.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor

# Values this far outside [0, 1] are taken as a different convention (e.g. mean/std-normalized or
# 0..255 images) and refused; smaller excursions are rounding noise from resizing or attacks.
IMAGE_RANGE_TOLERANCE = 1e-4


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as a float, requiring a finite number > 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not math.isfinite(float(value))
        or value <= 0
    ):
        raise ValueError(f"`{name}` must be a finite number > 0; got {_short(value)}.")
    return float(value)


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, requiring an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1; got {_short(value)}.")
    return int(value)


def check_probability(name: str, value: Any) -> float:
    """Return ``value`` as a float, requiring 0 < value < 1."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (0.0 < float(value) < 1.0):
        raise ValueError(f"`{name}` must be a number strictly between 0 and 1; got {_short(value)}.")
    return float(value)


def check_class_names(name: str, class_names: Any) -> list[str]:
    """Return a list of non-empty, distinct class names."""
    if isinstance(class_names, str) or not hasattr(class_names, "__iter__"):
        raise TypeError(f"`{name}` must be a sequence of strings; got {_short(class_names)}.")
    names = list(class_names)
    if not names:
        raise ValueError(f"`{name}` must hold at least one class name; got an empty sequence.")
    for i, item in enumerate(names):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"`{name}[{i}]` must be a non-empty string; got {_short(item)}.")
    seen: dict[str, int] = {}
    for i, item in enumerate(names):
        if item in seen:
            raise ValueError(
                f"`{name}` must hold distinct names; {item!r} appears at positions {seen[item]} and {i}."
            )
        seen[item] = i
    return names


def check_images(x: Any, name: str = "x", *, channels: int | None = None, unit_range: bool = True) -> Tensor:
    """Check the library's one image convention: a float tensor NCHW with values in [0, 1].

    Values within ``IMAGE_RANGE_TOLERANCE`` of the range are clamped into it; anything further
    out raises, because it almost always means normalized or 0..255 images were passed.
    ``unit_range=False`` leaves out the range test (and the clamping), for noisy images, which
    legitimately leave [0, 1].
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of images (N, C, H, W); got {type(x).__name__}.")
    if x.dim() != 4:
        raise ValueError(
            f"`{name}` must have 4 dimensions (N, C, H, W); got shape {tuple(x.shape)}."
            + (" Add a batch dimension with x.unsqueeze(0)." if x.dim() == 3 else "")
        )
    if not torch.is_floating_point(x):
        if not unit_range:
            raise TypeError(f"`{name}` must be a floating-point tensor; got dtype {x.dtype}.")
        raise TypeError(
            f"`{name}` must be a floating-point tensor with values in [0, 1]; got dtype {x.dtype}."
            " Convert with x.float() / 255 for 8-bit images."
        )
    if x.shape[0] == 0:
        raise ValueError(f"`{name}` must hold at least one image; got shape {tuple(x.shape)}.")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"`{name}` must have {channels} channel(s); got shape {tuple(x.shape)}.")
    values = x.detach()  # reading values must not touch the autograd graph of an attacked input
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"`{name}` contains NaN or infinite {'pixel ' if unit_range else ''}values.")
    if not unit_range:
        return x
    low, high = float(values.min()), float(values.max())
    if low < -IMAGE_RANGE_TOLERANCE or high > 1 + IMAGE_RANGE_TOLERANCE:
        raise ValueError(
            f"`{name}` must hold pixel values in [0, 1]; got values in [{low:.4g}, {high:.4g}]."
            " Pass un-normalized images; normalization belongs to the classifier's preprocessing."
        )
    if low < 0 or high > 1:
        x = x.clamp(0.0, 1.0)
    return x
