"""Printed digits rendered from the fonts that matplotlib ships, laid out as MNIST lays out its digits.

Training data for a text-to-image generator whose style differs from the handwritten digits the
bundled classifier knows, as a web-trained generator's images differ from ImageNet's: the regime
the paper targets. Each image is one digit in one of ``FONT_FILES``, at a random stroke weight
(a max filter on the large rendering), rotation and size, then, as in MNIST, scaled to fit a box of
at most 20×20 pixels and placed in 28×28 with its centre of mass at the centre.

    python scripts/printed_digits.py --grid runs/printed_digits.png   # look at a sample
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# Regular, bold, italic and bold-italic of four families, and four Computer Modern faces: every one
# has the ten numerals at their ASCII code points (the symbol, display and size-variant fonts do not).
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
)
_RENDER_SIZE = 96  # points; the glyph is drawn large, then shrunk with antialiasing
_CANVAS = 192
_MAX_ROTATION = 10.0  # degrees either way
_BOX_SIZES = (16, 17, 18, 19, 20)  # the longer side of the digit, in pixels (MNIST: 20)
_WEIGHT_FILTERS = (1, 3, 5, 7)  # max-filter sizes at the large rendering: 1 leaves the font's weight


@dataclass(frozen=True)
class PrintedDigits:
    """``images``: float (N, 1, 28, 28) in [0, 1], white digit on black; ``labels``: long (N,)."""

    images: Tensor
    labels: Tensor
    fonts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def font_paths() -> list[Path]:
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - matplotlib is in the dev and plot extras
        raise ImportError(
            "Printed digits are rendered from matplotlib's fonts: pip install nodata-defense[plot]"
        ) from error
    directory = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    missing = [name for name in FONT_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"matplotlib's font directory {directory} lacks {missing}")
    return [directory / name for name in FONT_FILES]


def _render(digit: int, font, rng: random.Random) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFilter

    canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
    ImageDraw.Draw(canvas).text((_CANVAS // 2, _CANVAS // 2), str(digit), fill=255, font=font, anchor="mm")
    weight = rng.choice(_WEIGHT_FILTERS)
    if weight > 1:
        canvas = canvas.filter(ImageFilter.MaxFilter(weight))
    canvas = canvas.rotate(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION), resample=Image.BICUBIC)
    glyph = canvas.crop(canvas.getbbox())
    scale = rng.choice(_BOX_SIZES) / max(glyph.size)
    size = (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale)))
    small = np.asarray(glyph.resize(size, Image.LANCZOS), dtype=np.float32) / 255.0
    small = np.clip(small, 0.0, 1.0)
    # Centre of mass to the centre of the 28×28 image, as MNIST does.
    rows, cols = np.indices(small.shape)
    mass = small.sum()
    top = int(round(14 - (rows * small).sum() / mass))
    left = int(round(14 - (cols * small).sum() / mass))
    top = min(max(top, 0), 28 - small.shape[0])
    left = min(max(left, 0), 28 - small.shape[1])
    image = np.zeros((28, 28), dtype=np.float32)
    image[top : top + small.shape[0], left : left + small.shape[1]] = small
    return image


def render_printed_digits(per_class: int = 500, seed: int = 0) -> PrintedDigits:
    """``per_class`` images of each digit 0–9, fonts taken in turn, the rest drawn from ``seed``;
    the same arguments give the same images."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"`per_class` must be a positive int; got {per_class!r}.")
    from PIL import ImageFont

    fonts = [ImageFont.truetype(str(path), _RENDER_SIZE) for path in font_paths()]
    rng = random.Random(seed)
    images, labels = [], []
    for digit in range(10):
        for k in range(per_class):
            images.append(_render(digit, fonts[k % len(fonts)], rng))
            labels.append(digit)
    return PrintedDigits(
        images=torch.from_numpy(np.stack(images))[:, None],
        labels=torch.tensor(labels, dtype=torch.long),
        fonts=FONT_FILES,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", type=Path, required=True, help="write a PNG grid of samples here")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from PIL import Image

    data = render_printed_digits(args.per_class, args.seed)
    grid = data.images[:, 0].reshape(10, args.per_class, 28, 28).permute(0, 2, 1, 3).reshape(280, -1)
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.numpy() * 255).round().astype(np.uint8)).resize(
        (grid.shape[1] * 2, 560), Image.NEAREST
    ).save(args.grid)


if __name__ == "__main__":
    main()
