"""Bundled small models and the demo data, so the whole method runs offline on a laptop.

- :func:`load_digits`: real MNIST digits split into ``"generator"``, ``"classifier"``, ``"test"``;
- :func:`load_digit_classifier`: a small CNN trained on the ``"classifier"`` split only;
- :func:`digit_t2i_path`: a small text-to-image pixel diffusion model trained on the
  ``"generator"`` split only (diffusers layout), used both as generator and as denoiser.
"""

from .digits import DIGIT_CLASS_NAMES, DigitSplit, load_digits
from .models import DigitCNN, digit_t2i_path, load_digit_classifier

__all__ = [
    "DIGIT_CLASS_NAMES",
    "DigitCNN",
    "DigitSplit",
    "digit_t2i_path",
    "load_digit_classifier",
    "load_digits",
]
