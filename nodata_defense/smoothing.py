"""Randomized smoothing: Monte Carlo prediction and l2 certification (Cohen, Rosenfeld & Kolter, 2019).

Given a base classifier ``F`` (images -> logits; its label is the argmax), the *smoothed*
classifier is ``g(x) = argmax_c P(F(x + delta) = c)`` with ``delta ~ N(0, sigma^2 I)``, the noise
being added in the library's ``[0, 1]`` pixel space (see ``docs/conventions.md``) and never clamped.

Guarantees (Cohen et al. 2019: Proposition 2, built on Theorem 1, and Proposition 1), per image:

* ``certify``: with probability at least ``1 - alpha`` over the noise drawn by the call, if it
  returns a label ``c`` with radius ``R`` (not ``ABSTAIN``), then ``g(x + e) = c`` for every
  perturbation with ``||e||_2 < R``, where ``R = sigma * Phi^-1(pA_lower)`` and ``pA_lower`` is the
  one-sided ``1 - alpha`` Clopper-Pearson lower bound of ``P(F(x + delta) = c)``.
* ``predict``: the probability that it returns a label other than ``g(x)`` (rather than a correct
  label or ``ABSTAIN``) is at most ``alpha``.

The bounds hold per image; for a simultaneous statement over ``m`` images use ``alpha / m``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import Tensor, nn
from tqdm.auto import tqdm

from nodata_defense._validation import (
    _short,
    check_images,
    check_positive_float,
    check_positive_int,
    check_probability,
)

ABSTAIN = -1
"""Label returned when the Monte Carlo evidence is too weak to commit to a class."""


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """Exact one-sided ``1 - alpha`` lower confidence bound of a binomial proportion.

    ``P(p >= bound) >= 1 - alpha`` for ``successes ~ Binomial(trials, p)``; the bound is the
    ``alpha`` quantile of ``Beta(successes, trials - successes + 1)``, and 0 when ``successes == 0``.
    """
    trials = check_positive_int("trials", trials)
    if isinstance(successes, bool) or not isinstance(successes, Integral) or not 0 <= successes <= trials:
        raise ValueError(f"`successes` must be an integer in [0, trials={trials}]; got {_short(successes)}.")
    alpha = check_probability("alpha", alpha)
    return float(_clopper_pearson_lower(np.array([int(successes)]), trials, alpha)[0])


def _clopper_pearson_lower(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    # beta.ppf is undefined for a zero shape parameter; the bound is 0 there by definition.
    safe = np.maximum(successes, 1)
    bound = beta.ppf(alpha, safe, trials - safe + 1)
    return np.where(successes == 0, 0.0, bound)


def certified_radius(pa_lower: float, sigma: float) -> float:
    """l2 radius ``sigma * Phi^-1(pa_lower)`` certified by a lower bound ``pa_lower`` on ``P(F = c)``.

    Non-positive when ``pa_lower <= 0.5``: no certificate, and ``certify`` abstains there.
    """
    if isinstance(pa_lower, bool) or not isinstance(pa_lower, Real) or not 0.0 <= float(pa_lower) <= 1.0:
        raise ValueError(f"`pa_lower` must be a probability in [0, 1]; got {_short(pa_lower)}.")
    sigma = check_positive_float("sigma", sigma)
    return float(sigma * norm.ppf(float(pa_lower)))


@dataclass(frozen=True)
class Certificate:
    """Result of ``SmoothedClassifier.certify`` for one image.

    ``label`` is the certified class or ``ABSTAIN`` (then ``radius`` is 0.0); ``count`` is how many
    of the ``n`` estimation samples ``F`` gave to the class guessed from the ``n0`` selection
    samples, and ``pa_lower`` its Clopper-Pearson lower bound (kept when abstaining, for diagnosis).
    ``seconds`` is the wall-clock time of the call shared equally among the images it certified.
    """

    label: int
    radius: float
    pa_lower: float
    count: int
    n: int
    n0: int
    alpha: float
    sigma: float
    seconds: float

    @property
    def abstained(self) -> bool:
        return self.label == ABSTAIN


@dataclass(frozen=True)
class Prediction:
    """Result of ``SmoothedClassifier.predict`` for one image.

    ``count`` and ``runner_up_count`` are the two largest class counts among the ``n`` samples;
    ``p_value`` is the two-sided binomial test of ``count`` against ``count + runner_up_count``
    at 1/2, and the label is ``ABSTAIN`` when ``p_value > alpha``.
    """

    label: int
    count: int
    runner_up_count: int
    n: int
    alpha: float
    p_value: float

    @property
    def abstained(self) -> bool:
        return self.label == ABSTAIN


class SmoothedClassifier:
    """The Gaussian-smoothed version ``g`` of a base classifier, with Monte Carlo predict/certify.

    ``base`` maps a float batch ``(B, C, H, W)`` of (noisy) ``[0, 1]``-space images to logits
    ``(B, num_classes)``. When it is an ``nn.Module``, noise is drawn on the device and in the
    dtype of its parameters and it runs in eval mode (its previous modes are restored afterwards);
    otherwise the device and dtype of the input images are used.
    """

    def __init__(self, base: Callable[[Tensor], Tensor], num_classes: int, sigma: float) -> None:
        if not callable(base):
            raise TypeError(f"`base` must be a callable mapping images to logits; got {type(base).__name__}.")
        num_classes = check_positive_int("num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be at least 2; got {num_classes}.")
        self.base = base
        self.num_classes = num_classes
        self.sigma = check_positive_float("sigma", sigma)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma}, num_classes={self.num_classes})"

    # ------------------------------------------------------------------------------------- sampling
    def sample_counts(
        self,
        x: Tensor,
        num: int,
        *,
        batch_size: int = 1_000,
        generator: torch.Generator | int | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        """Count the base labels of ``num`` noisy copies of each image: a CPU LongTensor (N, num_classes).

        The ``N * num`` noisy samples are laid out image after image and cut into base-model
        batches of ``batch_size``, so one batch may mix the samples of several images: small
        per-image ``num`` still fills the base model's batches. ``show_progress`` shows a tqdm bar.
        """
        num = check_positive_int("num", num)
        batch_size = check_positive_int("batch_size", batch_size)
        x = check_images(x)
        device, dtype = self._device_dtype(x)
        generator = _make_generator(generator, device)
        x = x.to(device=device, dtype=dtype)
        n_images, k = x.shape[0], self.num_classes
        total = n_images * num
        counts = torch.zeros(n_images * k, dtype=torch.long, device=device)
        modes = _eval_mode(self.base)
        progress = tqdm(total=total, unit="sample", disable=not show_progress, desc="smoothing")
        try:
            with torch.inference_mode():
                for start in range(0, total, batch_size):
                    stop = min(start + batch_size, total)
                    image_index = torch.arange(start, stop, device=device) // num
                    batch = x[image_index]
                    noise = torch.randn(batch.shape, generator=generator, device=device, dtype=dtype)
                    batch.add_(noise, alpha=self.sigma)
                    logits = self.base(batch)
                    if start == 0:
                        self._check_logits(logits, stop - start)
                    labels = logits.argmax(dim=1)
                    counts.index_add_(0, image_index * k + labels, torch.ones_like(labels))
                    progress.update(stop - start)
        finally:
            progress.close()
            _restore_modes(modes)
        return counts.view(n_images, k).cpu()

    # ------------------------------------------------------------------------------ public queries
    def certify(
        self,
        x: Tensor,
        *,
        n0: int = 100,
        n: int = 10_000,
        alpha: float = 0.001,
        batch_size: int = 1_000,
        generator: torch.Generator | int | None = None,
        show_progress: bool = False,
    ) -> list[Certificate]:
        """Certify each image of ``x``: its smoothed label and an l2 radius, or ``ABSTAIN``.

        Cohen et al.'s CERTIFY: ``n0`` samples pick the candidate class, ``n`` fresh samples bound
        its probability from below; abstain unless that bound exceeds 1/2. ``generator`` is a
        ``torch.Generator`` or an int seed (same seed, batch size and device: same result).
        """
        n0 = check_positive_int("n0", n0)
        n = check_positive_int("n", n)
        alpha = check_probability("alpha", alpha)
        batch_size = check_positive_int("batch_size", batch_size)
        x = check_images(x)
        generator = _make_generator(generator, self._device_dtype(x)[0])
        started = time.perf_counter()
        sample = partial(
            self.sample_counts, x, batch_size=batch_size, generator=generator, show_progress=show_progress
        )
        guess = sample(n0).argmax(dim=1)
        counts = sample(n)
        count_a = counts.gather(1, guess[:, None])[:, 0].numpy()
        pa_lower = _clopper_pearson_lower(count_a, n, alpha)
        seconds = (time.perf_counter() - started) / x.shape[0]
        certificates = []
        for c, na, pa in zip(guess.tolist(), count_a.tolist(), pa_lower.tolist(), strict=True):
            certified = pa > 0.5
            certificates.append(
                Certificate(
                    label=c if certified else ABSTAIN,
                    radius=self.sigma * float(norm.ppf(pa)) if certified else 0.0,
                    pa_lower=pa,
                    count=na,
                    n=n,
                    n0=n0,
                    alpha=alpha,
                    sigma=self.sigma,
                    seconds=seconds,
                )
            )
        return certificates

    def predict(
        self,
        x: Tensor,
        *,
        n: int = 1_000,
        alpha: float = 0.001,
        batch_size: int = 1_000,
        generator: torch.Generator | int | None = None,
        show_progress: bool = False,
    ) -> list[Prediction]:
        """Cohen et al.'s PREDICT for each image: ``g(x)``, or ``ABSTAIN`` when the top two are too close.

        Abstains unless a two-sided binomial test rejects, at level ``alpha``, that the top two
        classes are equally likely.
        """
        n = check_positive_int("n", n)
        alpha = check_probability("alpha", alpha)
        counts = self.sample_counts(
            x, n, batch_size=batch_size, generator=generator, show_progress=show_progress
        )
        # A stable sort makes the lowest class index win ties, so the result is deterministic.
        top, order = torch.sort(counts, dim=1, descending=True, stable=True)
        predictions = []
        for (na, nb), c in zip(top[:, :2].tolist(), order[:, 0].tolist(), strict=True):
            p_value = float(binomtest(na, na + nb, 0.5).pvalue)
            predictions.append(
                Prediction(
                    label=ABSTAIN if p_value > alpha else c,
                    count=na,
                    runner_up_count=nb,
                    n=n,
                    alpha=alpha,
                    p_value=p_value,
                )
            )
        return predictions

    # ------------------------------------------------------------------------------------- helpers
    def _device_dtype(self, x: Tensor) -> tuple[torch.device, torch.dtype]:
        if isinstance(self.base, nn.Module):
            for tensor in (*self.base.parameters(), *self.base.buffers()):
                if torch.is_floating_point(tensor):
                    return tensor.device, tensor.dtype
        return x.device, x.dtype

    def _check_logits(self, logits: Any, batch: int) -> None:
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"`base` must return a tensor of logits (batch, num_classes); got {type(logits).__name__}."
                " Wrap models that return output objects, e.g. lambda x: model(x).logits."
            )
        if tuple(logits.shape) != (batch, self.num_classes):
            raise ValueError(
                f"`base` must return logits of shape (batch, num_classes) = ({batch}, {self.num_classes});"
                f" got shape {tuple(logits.shape)}."
            )


def _make_generator(generator: torch.Generator | int | None, device: torch.device) -> torch.Generator | None:
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        if generator.device.type != device.type:
            raise ValueError(
                f"`generator` must live on the device the noise is drawn on ({device}); got one on"
                f" {generator.device}."
            )
        return generator
    if isinstance(generator, Integral) and not isinstance(generator, bool):
        return torch.Generator(device=device).manual_seed(int(generator))
    raise TypeError(f"`generator` must be a torch.Generator, an int seed or None; got {_short(generator)}.")


def _eval_mode(base: Any) -> list[tuple[nn.Module, bool]]:
    # Sub-modules may be in mixed modes (e.g. a frozen denoiser inside a training model), so each
    # one's own flag is saved rather than only the root's.
    if not isinstance(base, nn.Module):
        return []
    modes = [(module, module.training) for module in base.modules()]
    base.eval()
    return modes


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


__all__ = [
    "ABSTAIN",
    "Certificate",
    "Prediction",
    "SmoothedClassifier",
    "certified_radius",
    "clopper_pearson_lower",
]
