"""The bundled models: a small digit CNN and the path of the small digit text-to-image model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_model
from torch import Tensor, nn

from .._validation import check_images

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIGIT_CNN_DIR = WEIGHTS_DIR / "digits-cnn"
DIGIT_T2I_DIR = WEIGHTS_DIR / "digits-t2i"

# The usual MNIST pixel statistics; kept inside the module so callers pass plain [0, 1] images.
_MNIST_MEAN = 0.1307
_MNIST_STD = 0.3081


class DigitCNN(nn.Module, PyTorchModelHubMixin):
    """A small CNN for 28×28 grey digits: ``[0, 1]`` images ``(N, 1, 28, 28)`` → 10 logits.

    Its constructor arguments are its whole configuration, so ``save_pretrained`` writes them to
    ``config.json`` (weights to ``model.safetensors``) and ``DigitCNN.from_pretrained(dir)`` rebuilds it.
    """

    def __init__(self, num_classes: int = 10, width: int = 32, hidden: int = 128, dropout: float = 0.3):
        super().__init__()
        self.num_classes = num_classes
        self.width = width
        self.hidden = hidden
        self.dropout = dropout
        w = width

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(1, w),
            *block(w, w),
            nn.MaxPool2d(2),  # 14×14
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),  # 7×7
            *block(2 * w, 2 * w),
            nn.AdaptiveAvgPool2d(3),  # 3×3
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * w * 9, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = (x - _MNIST_MEAN) / _MNIST_STD
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 500) -> Tensor:
        """Predicted labels ``(N,)`` for ``[0, 1]`` images, in eval mode (the previous mode is restored)."""
        x = check_images(x, "x", channels=1)
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            out = [
                self(x[i : i + batch_size].to(device)).argmax(dim=1).cpu()
                for i in range(0, len(x), batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(out)

    def __repr__(self) -> str:
        return (
            f"DigitCNN(num_classes={self.num_classes}, width={self.width}, hidden={self.hidden}, "
            f"dropout={self.dropout}, parameters={sum(p.numel() for p in self.parameters())})"
        )


def _require(directory: Path, what: str) -> Path:
    if not directory.is_dir():
        raise FileNotFoundError(
            f"the bundled {what} is missing at {str(directory)!r}; reinstall nodata-defense or train it with "
            f"the script named in docs/zoo.md."
        )
    return directory


def load_digit_classifier() -> DigitCNN:
    """The bundled digit classifier (trained on the ``"classifier"`` split only), in eval mode."""
    # Rebuilt here rather than with DigitCNN.from_pretrained, which prints a line on every local load.
    directory = _require(DIGIT_CNN_DIR, "digit classifier")
    model = DigitCNN(**json.loads((directory / "config.json").read_text(encoding="utf-8")))
    load_model(model, directory / "model.safetensors")
    return model.eval()


def digit_t2i_path() -> Path:
    """Directory of the bundled digit text-to-image model (diffusers layout: unet/, scheduler/,
    text_encoder/, tokenizer/); pass it to any ``from_pretrained`` that reads that layout."""
    return _require(DIGIT_T2I_DIR, "digit text-to-image model")
