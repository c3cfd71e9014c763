import dataclasses
import math
from statistics import NormalDist

import pytest
import torch
from scipy.stats import binom
from torch import nn

from nodata_defense.smoothing import (
    ABSTAIN,
    Certificate,
    Prediction,
    SmoothedClassifier,
    certified_radius,
    clopper_pearson_lower,
)


def _threshold_base(threshold: float = 0.5):
    """Two classes decided by the first pixel of the noisy image: class 1 iff it exceeds ``threshold``.

    With the first pixel of x at value v, P(class 1) = Phi((v - threshold) / sigma) exactly, and the
    smoothed classifier is "class 1 iff v > threshold", whose robustness radius is exactly
    |v - threshold| = sigma * Phi^-1(pA): the known truth the soundness test checks against.
    """

    def base(z: torch.Tensor) -> torch.Tensor:
        above = z.flatten(1)[:, 0] > threshold
        return torch.stack([~above, above], dim=1).to(z.dtype)

    return base


def _constant_base(label: int, num_classes: int):
    def base(z: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(z.shape[0], num_classes, dtype=z.dtype, device=z.device)
        logits[:, label] = 1.0
        return logits

    return base


def _mean_base(z: torch.Tensor) -> torch.Tensor:
    # Three classes by the mean pixel: over 28x28 pixels the noise of the mean has std
    # 0.25 / 28 ~ 0.009, so images at 0.1 / 0.5 / 0.9 are classified the same under every draw
    # (the boundaries are > 20 standard deviations away): a deterministic base for these inputs.
    m = z.mean(dim=(1, 2, 3))
    label = (m > 0.3).long() + (m > 0.7).long()
    return nn.functional.one_hot(label, 3).to(z.dtype)


def _cp_lower_by_bisection(k: int, n: int, alpha: float) -> float:
    """Independent Clopper-Pearson lower bound: the p at which P(Binomial(n, p) >= k) = alpha."""
    if k == 0:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if binom.sf(k - 1, n, mid) < alpha:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# --------------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize(
    ("k", "n", "alpha"),
    [
        (0, 1, 0.05),
        (1, 1, 0.05),
        (0, 5, 0.001),
        (3, 5, 0.1),
        (5, 5, 0.001),
        (990, 1000, 0.001),
        (10_000, 10_000, 0.001),
    ],
)
def test_clopper_pearson_lower_matches_bisection(k, n, alpha):
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(_cp_lower_by_bisection(k, n, alpha), abs=1e-9)


def test_clopper_pearson_lower_closed_forms():
    assert clopper_pearson_lower(0, 10, 0.01) == 0.0
    # All successes: P(Bin(n, p) >= n) = p^n = alpha.
    assert clopper_pearson_lower(5, 5, 0.001) == pytest.approx(0.001 ** (1 / 5), rel=1e-12)
    assert clopper_pearson_lower(1, 1, 0.05) == pytest.approx(0.05, rel=1e-12)
    # One success in n: P(Bin(n, p) >= 1) = 1 - (1 - p)^n = alpha.
    assert clopper_pearson_lower(1, 5, 0.1) == pytest.approx(1 - 0.9 ** (1 / 5), rel=1e-10)


def test_certified_radius_matches_inverse_normal():
    for pa in (0.5, 0.6, 0.9, 0.999):
        assert certified_radius(pa, 0.25) == pytest.approx(0.25 * NormalDist().inv_cdf(pa), abs=1e-12)
    assert certified_radius(0.3, 1.0) < 0
    # Cohen et al.: N = 100,000 all correct, alpha = 0.001, sigma = 0.25 gives a radius of ~0.95.
    assert certified_radius(clopper_pearson_lower(100_000, 100_000, 0.001), 0.25) == pytest.approx(
        0.9535, abs=1e-3
    )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: clopper_pearson_lower(6, 5, 0.1),
            r"`successes` must be an integer in \[0, trials=5\]; got 6",
        ),
        (lambda: clopper_pearson_lower(-1, 5, 0.1), r"`successes`.*got -1"),
        (lambda: clopper_pearson_lower(1, 0, 0.1), r"`trials` must be an integer >= 1; got 0"),
        (
            lambda: clopper_pearson_lower(1, 5, 1.0),
            r"`alpha` must be a number strictly between 0 and 1; got 1.0",
        ),
        (lambda: certified_radius(1.5, 0.25), r"`pa_lower` must be a probability in \[0, 1\]; got 1.5"),
        (lambda: certified_radius(0.9, 0.0), r"`sigma` must be a finite number > 0; got 0.0"),
    ],
)
def test_pure_function_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------------ certify
def test_certificate_fields_for_a_constant_base():
    smooth = SmoothedClassifier(_constant_base(2, 4), num_classes=4, sigma=0.5)
    (cert,) = smooth.certify(torch.rand(1, 3, 4, 4), n0=10, n=200, alpha=0.01, batch_size=64, generator=0)
    assert isinstance(cert, Certificate) and not cert.abstained
    assert (cert.label, cert.count, cert.n, cert.n0, cert.alpha, cert.sigma) == (2, 200, 200, 10, 0.01, 0.5)
    assert cert.pa_lower == pytest.approx(0.01 ** (1 / 200))
    assert cert.radius == pytest.approx(0.5 * NormalDist().inv_cdf(0.01 ** (1 / 200)))
    assert cert.seconds >= 0
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign"):
        cert.radius = 1.0  # type: ignore[misc]


def test_certify_soundness_simulation():
    """Wrong certificates happen at a rate <= alpha, and (power check) close to alpha at the edge.

    12,000 certifications in one batched call. Group A: pA set just below the Clopper-Pearson
    bound of k_star successes, so P(certified radius > true radius) is close to alpha. Group B:
    pA = 0.501 (true label 0), so a wrong label is possible. A certificate is wrong when it is not
    ABSTAIN and either its label is not the true g(x) or its radius exceeds sigma * Phi^-1(pA).
    """
    sigma, alpha, n0, n, per_group = 0.25, 0.1, 20, 100, 6_000
    k_star = 85
    pa_edge = _cp_lower_by_bisection(k_star, n, alpha) - 1e-4  # ~0.79
    pa_b = 0.501
    v_a = 0.5 + sigma * NormalDist().inv_cdf(pa_edge)  # class 1 is the majority
    v_b = 0.5 - sigma * NormalDist().inv_cdf(pa_b)  # class 0 is the majority
    x = torch.cat([torch.full((per_group, 1, 1, 1), v_a), torch.full((per_group, 1, 1, 1), v_b)])
    # The truth is computed from the float32 pixel values the base actually sees.
    v = x.flatten().double()
    true_label = (v > 0.5).long()
    true_radius = (v - 0.5).abs() - 1e-6  # float32 rounding of x + noise is ~1e-7

    smooth = SmoothedClassifier(_threshold_base(0.5), num_classes=2, sigma=sigma)
    certs = smooth.certify(x, n0=n0, n=n, alpha=alpha, batch_size=100_000, generator=1234)
    wrong = [
        not c.abstained and (c.label != int(t) or c.radius > float(r))
        for c, t, r in zip(certs, true_label, true_radius, strict=True)
    ]
    m = len(certs)
    # Each certification is wrong independently with probability <= alpha (Cohen et al., Prop. 2),
    # so the count is stochastically below Binomial(m, alpha): exceeding its 1 - 1e-6 quantile
    # has probability <= 1e-6 for a correct implementation (false-failure probability <= 1e-6).
    assert sum(wrong) <= binom.ppf(1 - 1e-6, m, alpha)

    # Power: in group A, picking class 1 (probability >= P(more than n0/2 votes)) and then drawing
    # nA >= k_star (certificate beyond the true radius) happens with probability p_low below.
    # Falling under the 1e-6 quantile of Binomial(per_group, p_low) has probability <= 1e-6.
    p_low = binom.sf(n0 // 2, n0, pa_edge) * binom.sf(k_star - 1, n, pa_edge)
    assert p_low > 0.09  # the edge case is close to alpha, so a too-loose bound would be caught
    assert sum(wrong[:per_group]) >= binom.ppf(1e-6, per_group, p_low)

    # Group A's certified radii are never beyond the largest one the bound can give.
    radii = [c.radius for c in certs[:per_group] if not c.abstained]
    assert max(radii) <= sigma * NormalDist().inv_cdf(clopper_pearson_lower(n, n, alpha)) + 1e-12


def test_certify_and_predict_abstain_on_a_coin_flip():
    # The base's label is a fair coin under the noise (pixel exactly on the threshold).
    # certify answers with probability <= alpha = 0.001 per image, predict too (exact binomial
    # test of level alpha); over 200 images each count of answers is below Binomial(200, 0.001):
    # P(>= 5) <= 2.6e-6, so the false-failure probability of the two asserts is < 6e-6.
    x = torch.full((200, 1, 2, 2), 0.5)
    smooth = SmoothedClassifier(_threshold_base(0.5), num_classes=2, sigma=0.25)
    certs = smooth.certify(x, n0=50, n=500, alpha=0.001, batch_size=20_000, generator=7)
    preds = smooth.predict(x, n=500, alpha=0.001, batch_size=20_000, generator=8)
    assert binom.sf(4, 200, 0.001) < 3e-6
    assert sum(not c.abstained for c in certs) <= 4
    assert sum(not p.abstained for p in preds) <= 4
    assert all(c.radius == 0.0 and c.label == ABSTAIN for c in certs if c.abstained)
    assert all(p.label == ABSTAIN and p.count + p.runner_up_count == 500 for p in preds if p.abstained)


def test_predict_on_a_constant_base():
    smooth = SmoothedClassifier(_constant_base(1, 3), num_classes=3, sigma=0.25)
    (pred,) = smooth.predict(torch.rand(1, 1, 4, 4), n=20, alpha=0.001, generator=0)
    assert isinstance(pred, Prediction) and not pred.abstained
    assert (pred.label, pred.count, pred.runner_up_count, pred.n) == (1, 20, 0, 20)
    assert pred.p_value == pytest.approx(2 * 0.5**20)
    # Too few samples to reject at this level: 2 * 0.5^5 = 0.0625 > 0.001.
    (few,) = smooth.predict(torch.rand(1, 1, 4, 4), n=5, alpha=0.001, generator=0)
    assert few.abstained and few.p_value == pytest.approx(0.0625)


# ------------------------------------------------------------------------------ batching & state
def test_batched_counts_equal_per_image_counts():
    x = torch.cat([torch.full((1, 1, 28, 28), v) for v in (0.1, 0.9, 0.5, 0.9, 0.1)])
    smooth = SmoothedClassifier(_mean_base, num_classes=3, sigma=0.25)
    # 7 samples per image in batches of 5: batches straddle image boundaries.
    batched = smooth.sample_counts(x, 7, batch_size=5, generator=0)
    single = torch.cat([smooth.sample_counts(x[i : i + 1], 7, batch_size=5, generator=0) for i in range(5)])
    expected = torch.tensor([[7, 0, 0], [0, 0, 7], [0, 7, 0], [0, 0, 7], [7, 0, 0]])
    assert batched.dtype == torch.long and torch.equal(batched, expected) and torch.equal(single, expected)
    labels = [c.label for c in smooth.certify(x, n0=5, n=50, batch_size=64, generator=0)]
    assert labels == [0, 2, 1, 2, 0]
    assert labels == [smooth.certify(x[i : i + 1], n0=5, n=50, generator=0)[0].label for i in range(5)]


def test_same_seed_same_result_and_generator_objects():
    x = torch.full((6, 1, 1, 1), 0.55)
    smooth = SmoothedClassifier(_threshold_base(0.5), num_classes=2, sigma=0.25)

    def strip(certs):
        return [dataclasses.replace(c, seconds=0.0) for c in certs]

    a = strip(smooth.certify(x, n0=10, n=300, batch_size=128, generator=3))
    b = strip(smooth.certify(x, n0=10, n=300, batch_size=128, generator=torch.Generator().manual_seed(3)))
    c = strip(smooth.certify(x, n0=10, n=300, batch_size=128, generator=4))
    assert a == b
    assert a != c  # P(identical counts for 6 images under a new seed) is far below 1e-9
    assert smooth.predict(x, n=300, generator=5) == smooth.predict(x, n=300, generator=5)


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.dropout = nn.Dropout(0.5)
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, z.dtype))
        return self.linear(self.dropout(z.flatten(1)))


def test_eval_during_sampling_modes_restored_and_model_dtype():
    model = _Recorder().double()
    model.train()
    model.dropout.eval()  # mixed modes must come back exactly as they were
    smooth = SmoothedClassifier(model, num_classes=2, sigma=0.25)
    smooth.certify(torch.rand(3, 1, 2, 2), n0=4, n=10, batch_size=8, generator=0)
    assert model.seen and all(seen == (False, torch.float64) for seen in model.seen)
    assert model.training and model.linear.training and not model.dropout.training


def test_repr_shows_hyper_parameters():
    assert (
        repr(SmoothedClassifier(_mean_base, num_classes=3, sigma=0.5))
        == "SmoothedClassifier(sigma=0.5, num_classes=3)"
    )


# ---------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sigma": 0.0}, ValueError, r"`sigma` must be a finite number > 0; got 0.0"),
        ({"sigma": -1}, ValueError, r"`sigma` must be a finite number > 0; got -1"),
        ({"sigma": math.nan}, ValueError, r"`sigma` must be a finite number > 0; got nan"),
        ({"num_classes": 0}, ValueError, r"`num_classes` must be an integer >= 1; got 0"),
        ({"num_classes": 1}, ValueError, r"`num_classes` must be at least 2; got 1"),
        ({"base": "resnet"}, TypeError, r"`base` must be a callable.*str"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    args = {"base": _mean_base, "num_classes": 3, "sigma": 0.25} | kwargs
    with pytest.raises(error, match=match):
        SmoothedClassifier(**args)


@pytest.mark.parametrize(
    ("method", "x", "kwargs", "error", "match"),
    [
        ("certify", None, {"n0": 0}, ValueError, r"`n0` must be an integer >= 1; got 0"),
        ("certify", None, {"n": -5}, ValueError, r"`n` must be an integer >= 1; got -5"),
        (
            "certify",
            None,
            {"alpha": 0.0},
            ValueError,
            r"`alpha` must be a number strictly between 0 and 1; got 0.0",
        ),
        ("predict", None, {"alpha": 1.5}, ValueError, r"`alpha` must be .* between 0 and 1; got 1.5"),
        ("certify", None, {"batch_size": 0}, ValueError, r"`batch_size` must be an integer >= 1; got 0"),
        ("predict", None, {"batch_size": 2.5}, ValueError, r"`batch_size` must be an integer >= 1; got 2.5"),
        ("predict", None, {"n": 0}, ValueError, r"`n` must be an integer >= 1; got 0"),
        ("certify", torch.rand(1, 28, 28), {}, ValueError, r"`x` must have 4 dimensions.*\(1, 28, 28\)"),
        (
            "predict",
            torch.zeros(1, 1, 28, 28, dtype=torch.uint8),
            {},
            TypeError,
            r"`x` must be a floating.*uint8",
        ),
        ("certify", torch.full((1, 1, 28, 28), math.nan), {}, ValueError, r"`x` contains NaN"),
        (
            "certify",
            torch.full((1, 1, 28, 28), 255.0),
            {},
            ValueError,
            r"`x` must hold pixel values in \[0, 1\]",
        ),
        ("certify", None, {"generator": "seed"}, TypeError, r"`generator` must be a torch.Generator, an int"),
    ],
)
def test_query_errors(method, x, kwargs, error, match):
    smooth = SmoothedClassifier(_mean_base, num_classes=3, sigma=0.25)
    x = torch.rand(2, 1, 28, 28) if x is None else x
    with pytest.raises(error, match=match):
        getattr(smooth, method)(x, **kwargs)


def test_sample_counts_errors():
    smooth = SmoothedClassifier(_mean_base, num_classes=3, sigma=0.25)
    with pytest.raises(ValueError, match=r"`num` must be an integer >= 1; got 0"):
        smooth.sample_counts(torch.rand(1, 1, 2, 2), 0)


def test_base_returning_wrong_shape_or_type():
    wrong_classes = SmoothedClassifier(_mean_base, num_classes=10, sigma=0.25)
    with pytest.raises(ValueError, match=r"\(batch, num_classes\) = \(8, 10\); got shape \(8, 3\)"):
        wrong_classes.certify(torch.rand(2, 1, 4, 4), n0=4, n=4, batch_size=8)
    not_tensor = SmoothedClassifier(lambda z: {"logits": z}, num_classes=2, sigma=0.25)
    with pytest.raises(TypeError, match=r"`base` must return a tensor of logits.*got dict"):
        not_tensor.predict(torch.rand(2, 1, 4, 4), n=4)
    model = _Recorder()
    model.train()
    with pytest.raises(ValueError, match=r"got shape \(4, 2\)"):
        SmoothedClassifier(model, num_classes=5, sigma=0.25).predict(torch.rand(1, 1, 2, 2), n=4)
    assert model.training  # restored even when the base fails


def test_show_progress_writes_a_bar_only_when_asked(capsys):
    smooth = SmoothedClassifier(_mean_base, num_classes=3, sigma=0.25)
    smooth.sample_counts(torch.rand(2, 1, 4, 4), 10, batch_size=8)
    assert capsys.readouterr().err == ""
    smooth.sample_counts(torch.rand(2, 1, 4, 4), 10, batch_size=8, show_progress=True)
    assert "20/20" in capsys.readouterr().err
