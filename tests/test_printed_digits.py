"""scripts/printed_digits.py: the printed-digit training data of the style-shift generator."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
pytest.importorskip("matplotlib")
pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def printed():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import printed_digits

        yield printed_digits
    finally:
        sys.path.remove(str(SCRIPTS))


def test_printed_digits_are_mnist_shaped_centred_and_reproducible(printed):
    data = printed.render_printed_digits(per_class=3, seed=5)
    assert len(data) == 30 and data.images.shape == (30, 1, 28, 28) and data.images.dtype == torch.float32
    assert data.labels.tolist() == [d for d in range(10) for _ in range(3)]
    assert float(data.images.min()) == 0.0 and 0.9 < float(data.images.max()) <= 1.0
    # Every image holds a digit inside the 20x20 box, its centre of mass within a pixel of the centre.
    grid = torch.arange(28, dtype=torch.float32)
    for image in data.images[:, 0]:
        assert image.sum() > 10
        rows, cols = image.nonzero(as_tuple=True)
        assert int(rows.max() - rows.min()) < 20 and int(cols.max() - cols.min()) < 20
        mass = image.sum()
        assert abs(float((image.sum(1) * grid).sum() / mass) - 14) <= 1.0
        assert abs(float((image.sum(0) * grid).sum() / mass) - 14) <= 1.0
    assert torch.equal(data.images, printed.render_printed_digits(per_class=3, seed=5).images)
    assert not torch.equal(data.images, printed.render_printed_digits(per_class=3, seed=6).images)
    # The ten digits of one font differ from each other.
    first_font = data.images[::3, 0].flatten(1)
    assert torch.cdist(first_font, first_font).add(torch.eye(10) * 1e9).min() > 1.0


@pytest.mark.parametrize("per_class", [0, -1, 2.5, True])
def test_printed_digits_refuse_a_bad_count(printed, per_class):
    with pytest.raises(ValueError, match=r"`per_class` must be a positive int; got "):
        printed.render_printed_digits(per_class=per_class)
