import pytest
import torch

from nodata_defense._validation import (
    check_class_names,
    check_images,
    check_positive_float,
    check_positive_int,
    check_probability,
)


def test_check_images_accepts_and_clamps_rounding_noise():
    x = torch.rand(2, 3, 4, 4)
    x[0, 0, 0, 0] = 1 + 5e-5
    out = check_images(x)
    assert out.max() <= 1.0 and out.shape == x.shape


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.rand(3, 4, 4), ValueError, r"`x` must have 4 dimensions.*\(3, 4, 4\)"),
        (torch.zeros(1, 1, 2, 2, dtype=torch.uint8), TypeError, r"`x` must be a floating-point.*uint8"),
        (torch.full((1, 1, 2, 2), float("nan")), ValueError, r"`x` contains NaN"),
        (torch.full((1, 1, 2, 2), 2.0), ValueError, r"`x` must hold pixel values in \[0, 1\].*\[2, 2\]"),
        ([[0.0]], TypeError, r"`x` must be a torch.Tensor.*list"),
        (torch.rand(0, 1, 2, 2), ValueError, r"at least one image"),
    ],
)
def test_check_images_rejects(x, error, match):
    with pytest.raises(error, match=match):
        check_images(x)


def test_scalar_checks_name_argument_and_value():
    with pytest.raises(ValueError, match=r"`sigma` must be a finite number > 0; got -1"):
        check_positive_float("sigma", -1)
    with pytest.raises(ValueError, match=r"`sigma` must be a finite number > 0; got nan"):
        check_positive_float("sigma", float("nan"))
    with pytest.raises(ValueError, match=r"`n` must be an integer >= 1; got 0"):
        check_positive_int("n", 0)
    with pytest.raises(ValueError, match=r"`alpha` must be a number strictly between 0 and 1; got 1"):
        check_probability("alpha", 1)
    assert check_positive_float("sigma", 0.25) == 0.25


def test_check_class_names():
    assert check_class_names("class_names", ("a", "b")) == ["a", "b"]
    with pytest.raises(ValueError, match=r"`class_names` must hold at least one"):
        check_class_names("class_names", [])
    with pytest.raises(ValueError, match=r"distinct names; 'a' appears at positions 0 and 2"):
        check_class_names("class_names", ["a", "b", "a"])
    with pytest.raises(TypeError, match=r"`class_names` must be a sequence of strings"):
        check_class_names("class_names", "abc")


def test_check_images_keeps_gradients_and_does_not_warn():
    x = torch.rand(1, 1, 3, 3, requires_grad=True)
    out = check_images(x)
    out.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))
