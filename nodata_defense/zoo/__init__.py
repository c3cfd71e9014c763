"""Bundled small models and the demo data, so the whole method runs offline on a laptop.

- :func:`load_digits`: real MNIST digits split into ``"generator"``, ``"classifier"``, ``"test"``;
- :func:`load_digit_classifier`: a small CNN trained on the ``"classifier"`` split only;
- :func:`digit_t2i_path`: a small text-to-image pixel diffusion model trained on the
  ``"generator"`` split only (diffusers layout), used both as generator and as denoiser.
"""

from pathlib import Path

from .digits import DIGIT_CLASS_NAMES, DigitSplit, load_digits
from .models import WEIGHTS_DIR, DigitCNN, _require, digit_t2i_path, load_digit_classifier


def digit_denoiser_path() -> Path:
    """Directory of the bundled digit denoiser: the same text-to-image family as ``digits-t2i`` with
    channels (8, 16, 32), ~10x cheaper per sample, also trained on the ``"generator"`` split only."""
    return _require(WEIGHTS_DIR / "digits-denoiser", "digit denoiser")


__all__ = [
    "DIGIT_CLASS_NAMES",
    "DigitCNN",
    "DigitSplit",
    "digit_denoiser_path",
    "digit_t2i_path",
    "load_digit_classifier",
    "load_digits",
]
