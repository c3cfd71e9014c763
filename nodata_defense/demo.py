"""The offline digits demo: the whole method on real handwritten digits, with honest baselines.

    nodata-defense demo                      # or: python -m nodata_defense.demo
    nodata-defense demo --n-test 500 --n 10000 --n0 100

It uses only the bundled models (``nodata_defense.zoo``): the classifier ``digits-cnn`` (trained
on the split ``"classifier"`` = C), the text-to-image model ``digits-t2i`` and the denoiser
``digits-denoiser`` (both trained on the split ``"generator"`` = G). The method's references are
synthesized from the class names by ``digits-t2i``: the robustification never sees C nor the
test split T. It then certifies the first ``n_test`` images of T (a stratified order, fixed) at
each σ with five base classifiers, all through the same smoothing core
(:class:`~nodata_defense.smoothing.SmoothedClassifier`):

1. ``gaussian``: Gaussian smoothing of the plain classifier (Cohen et al., 2019);
2. ``denoiser``: the off-the-shelf one-shot denoiser in front of it (Carlini et al., 2023);
3. ``personalized``: the denoiser personalized with LoRA on the synthetic references, original
   classifier (Choi et al., 2024, without the classifier adaptation);
4. ``full_method``: + classifier adaptation: ``Robustifier(...).fit()``, the full method;
5. ``full_data``: the same ``fit`` with the real split C as references instead of synthetic
   ones: what a user who has the training data could do.

Rows 3 and 4 come from one fit per σ. Fitted models are saved in ``work_dir`` (with a fingerprint
of everything they depend on), so a re-run skips fitting. Every row at a given σ sees the same
noise draws (the same seed per chunk of images), which makes the rows' differences less noisy.

Outputs in ``out_dir``: ``certificates.tsv`` (one line per row, σ and image), ``summary.json``
(certified accuracy per row × σ × radius, settings, seconds per stage, library versions) and
``certified_accuracy.png`` (curves; needs matplotlib: ``pip install nodata-defense[demo]``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._hub import library_versions
from ._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .config import AdaptConfig, PersonalizeConfig, RobustifierConfig, SynthesisConfig
from .denoiser import DenoisedClassifier, DiffusionDenoiser
from .robust_model import RobustModel
from .smoothing import ABSTAIN, SmoothedClassifier

if TYPE_CHECKING:
    from .synthesis import ReferenceSet

Row = Literal["gaussian", "denoiser", "personalized", "full_method", "full_data"]
ROWS: tuple[str, ...] = get_args(Row)
ROW_TITLES: dict[str, str] = {
    "gaussian": "Gaussian smoothing, plain classifier",
    "denoiser": "+ off-the-shelf denoiser",
    "personalized": "+ self-personalized denoiser",
    "full_method": "+ classifier adaptation (full method)",
    "full_data": "full-data reference (real split C)",
}
# Which fit a row needs: "synthetic" (references from class names) or "full_data" (split C).
FIT_OF_ROW = {"personalized": "synthetic", "full_method": "synthetic", "full_data": "full_data"}
# The test order is fixed whatever the demo's seed, so runs with other seeds certify the same images.
TEST_ORDER_SEED = 0
TSV_COLUMNS = ("row", "sigma", "index", "label", "prediction", "radius", "correct", "pa_lower", "count")
# 2: the denoiser by its sha256 alone (1 also had its absolute path, so a checkout elsewhere refitted).
_FINGERPRINT_FORMAT = 2
# Noisy samples per smoothing call: sets the size of the chunks of images certified together.
_SAMPLES_PER_CHUNK = 20_000


class DemoConfig(BaseModel):
    """Settings of :func:`run_demo`; the defaults are sized to finish within 10 minutes on 2 CPU cores.

    The measured wall clock is in docs/demo.md (``benchmarks/demo_time.py`` writes it).

    ``work_dir`` (default ``<out_dir>/work``) keeps the synthetic references and the fitted models,
    so a re-run with the same fit settings only certifies. ``generator`` / ``denoiser`` default to
    the bundled ``digits-t2i`` / ``digits-denoiser`` directories.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sigmas: tuple[float, ...] = Field((0.25, 0.5, 1.0), min_length=1)
    rows: tuple[Row, ...] = Field(ROWS, min_length=1)
    n_test: int = Field(
        50, ge=1, le=1500, description="Test images: the first n_test of a stratified order of T."
    )
    n0: int = Field(40, ge=1, description="Selection samples of CERTIFY.")
    n: int = Field(
        320,
        ge=1,
        description="Estimation samples of CERTIFY (320 at alpha = 0.001 reaches radius 2.03 sigma).",
    )
    alpha: float = Field(0.001, gt=0, lt=1)
    batch_size: int = Field(
        250, ge=1, description="Noisy samples per forward pass (a few hundred is fastest on a CPU)."
    )
    channels_last: bool = Field(
        True,
        description="Run the certified models in the channels_last memory format (faster convolutions on a CPU;"
        " docs/performance.md).",
    )
    radii: tuple[float, ...] = Field((0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0), min_length=1)
    shots_per_class: int = Field(10, ge=1, description="Synthetic references per class.")
    synthesis_steps: int = Field(25, ge=1, description="DDIM steps of the text-to-image model.")
    guidance_scale: float | None = Field(
        None, ge=0, description="None: the paper's rule (7 for 1 shot, else 4)."
    )
    personalize_steps: int = Field(200, ge=1)
    personalize_batch_size: int = Field(24, ge=1)
    personalize_lr: float = Field(1e-4, gt=0)
    lora_rank: int = Field(4, ge=1)
    classifier_weight: float = Field(0.01, ge=0, description="lambda of the personalization loss.")
    adapt_mode: Literal["full", "lora", "head", "none"] = "full"
    adapt_epochs: int = Field(10, ge=1)
    adapt_lr: float = Field(
        5e-5,
        gt=0,
        description="Chosen on dev digits (benchmarks/adaptation_dev.py); 1e-4 hurt at sigma <= 0.5.",
    )
    full_data_per_class: int | None = Field(
        50, ge=1, le=200, description="Real references per class for the full_data row; None: all of C."
    )
    seed: int = 0
    out_dir: str = "demo-results"
    work_dir: str | None = None
    generator: str | None = Field(
        None, description="Text-to-image model directory; None: bundled digits-t2i."
    )
    denoiser: str | None = Field(None, description="Denoiser directory; None: bundled digits-denoiser.")
    show_progress: bool = True

    @field_validator("sigmas")
    @classmethod
    def _positive_sigmas(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not (math.isfinite(s) and s > 0) for s in value) or len(set(value)) != len(value):
            raise ValueError(f"`sigmas` must be distinct positive numbers; got {value}")
        return value

    @field_validator("rows")
    @classmethod
    def _distinct_rows(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"`rows` must not repeat a row; got {value}")
        return tuple(r for r in ROWS if r in value)  # the table's order

    @field_validator("radii")
    @classmethod
    def _sorted_radii(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not (math.isfinite(r) and r >= 0) for r in value) or list(value) != sorted(set(value)):
            raise ValueError(f"`radii` must be increasing, distinct and >= 0; got {value}")
        return value

    @model_validator(mode="after")
    def _enough_samples(self) -> DemoConfig:
        # With n samples, the largest lower bound is alpha ** (1 / n); below 1/2 nothing can be certified.
        if self.alpha ** (1.0 / self.n) <= 0.5:
            raise ValueError(
                f"`n`={self.n} is too small to certify anything at alpha={self.alpha:g}: even n successes out"
                f" of n give a lower bound of {self.alpha ** (1.0 / self.n):.3f} <= 0.5."
            )
        return self

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir) if self.work_dir is not None else Path(self.out_dir) / "work"

    def robustifier_config(self, sigma: float, references: str = "synthetic") -> RobustifierConfig:
        """The ``RobustifierConfig`` of the fit at ``sigma`` (``references``: "synthetic" or "full_data")."""
        if references not in ("synthetic", "full_data"):
            raise ValueError(f"`references` must be 'synthetic' or 'full_data'; got {references!r}.")
        shots = self.shots_per_class if references == "synthetic" else self.full_data_per_class or 200
        return RobustifierConfig(
            sigma=sigma,
            seed=self.seed,
            synthesis=SynthesisConfig(
                shots_per_class=shots,
                num_inference_steps=self.synthesis_steps,
                guidance_scale=self.guidance_scale,
                batch_size=50,
                seed=self.seed,
            ),
            personalize=PersonalizeConfig(
                steps=self.personalize_steps,
                batch_size=self.personalize_batch_size,
                learning_rate=self.personalize_lr,
                lora_rank=self.lora_rank,
                classifier_weight=self.classifier_weight,
                seed=self.seed,
            ),
            adapt=AdaptConfig(
                mode=self.adapt_mode, epochs=self.adapt_epochs, learning_rate=self.adapt_lr, seed=self.seed
            ),
            denoiser_prompt="",
        )


# --------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class CertificateRecord:
    """One certified test image: ``prediction`` is ``-1`` when smoothing abstained (radius 0)."""

    row: str
    sigma: float
    index: int
    label: int
    prediction: int
    radius: float
    pa_lower: float
    count: int

    @property
    def correct(self) -> bool:
        return self.prediction == self.label

    def tsv(self) -> str:
        return (
            f"{self.row}\t{self.sigma:g}\t{self.index}\t{self.label}\t{self.prediction}\t{self.radius:.6f}"
            f"\t{int(self.correct)}\t{self.pa_lower:.8f}\t{self.count}"
        )

    @classmethod
    def from_tsv(cls, line: str) -> CertificateRecord:
        row, sigma, index, label, prediction, radius, _, pa_lower, count = line.rstrip("\n").split("\t")
        return cls(
            row,
            float(sigma),
            int(index),
            int(label),
            int(prediction),
            float(radius),
            float(pa_lower),
            int(count),
        )


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` measured.

    ``accuracy[row][sigma]`` holds the certified accuracy at each of ``config.radii``: the fraction
    of test images certified with the correct label and a radius ``>= r`` (at ``r = 0``: correct and
    not abstained). ``seconds`` holds the wall-clock time of each stage; ``files`` the outputs.
    """

    config: DemoConfig
    accuracy: dict[str, dict[float, tuple[float, ...]]]
    records: tuple[CertificateRecord, ...]
    seconds: dict[str, float]
    files: dict[str, Path] = field(default_factory=dict)

    def table(self) -> str:
        return format_table(self.accuracy, self.config.radii, self.config.sigmas, self.config.rows)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"DemoResult(rows={list(c.rows)}, sigmas={list(c.sigmas)}, n_test={c.n_test}, n0={c.n0}, n={c.n},"
            f" alpha={c.alpha:g}, seconds={self.seconds.get('total', float('nan')):.0f})"
        )


def certified_accuracy(records: Iterable[CertificateRecord], radii: Sequence[float]) -> tuple[float, ...]:
    """Fraction of ``records`` with the correct label and radius ``>= r``, for each ``r`` of ``radii``.

    An abstention is never correct (its prediction is -1), so at ``r = 0`` this is the fraction of
    correct, non-abstained answers; the values are non-increasing in ``r``.
    """
    records = list(records)
    if not records:
        raise ValueError("`records` is empty: certified accuracy needs at least one certificate.")
    return tuple(sum(rec.correct and rec.radius >= r for rec in records) / len(records) for r in radii)


def format_table(
    accuracy: Mapping[str, Mapping[float, Sequence[float]]],
    radii: Sequence[float],
    sigmas: Sequence[float],
    rows: Sequence[str],
) -> str:
    """Plain-text table: one block per σ, one line per row, certified accuracy (%) per radius."""
    title_width = max(len(ROW_TITLES[r]) for r in rows)
    header = f"{'':<{title_width}} | " + " ".join(f"r={r:<5g}" for r in radii)
    lines = []
    for sigma in sigmas:
        lines += [f"sigma = {sigma:g}", header, "-" * len(header)]
        for row in rows:
            values = accuracy.get(row, {}).get(sigma)
            cells = (
                " ".join(f"{100 * a:7.1f}" for a in values)
                if values is not None
                else " ".join(f"{'-':>7}" for _ in radii)
            )
            lines.append(f"{ROW_TITLES[row]:<{title_width}} | {cells}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def markdown_table(
    accuracy: Mapping[str, Mapping[float, Sequence[float]]],
    radii: Sequence[float],
    sigmas: Sequence[float],
    rows: Sequence[str],
    counts: Mapping[tuple[str, float], int] | None = None,
) -> str:
    """Markdown table of certified accuracy (%): one line per (σ, row)."""
    head = "| σ | base classifier | " + " | ".join(f"r = {r:g}" for r in radii) + " |"
    if counts is not None:
        head += " images |"
    lines = [head, "|---|---|" + "---:|" * (len(radii) + (counts is not None))]
    for sigma in sigmas:
        for row in rows:
            values = accuracy.get(row, {}).get(sigma)
            cells = [f"{100 * a:.1f}" for a in values] if values is not None else ["–"] * len(radii)
            line = f"| {sigma:g} | {ROW_TITLES[row]} | " + " | ".join(cells) + " |"
            if counts is not None:
                line += f" {counts.get((row, sigma), 0)} |"
            lines.append(line)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- test data
def stratified_order(seed: int = TEST_ORDER_SEED) -> np.ndarray:
    """Indices into the ``"test"`` split, stratified: class 0, 1, ..., 9, then class 0 again, ...

    Each class's images are shuffled with ``seed`` and the classes are interleaved, so any prefix
    holds (nearly) as many images of each class and a longer run extends a shorter one.
    """
    from .zoo import load_digits

    labels = load_digits("test").labels.numpy()
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    length = max(len(p) for p in per_class)
    order = [p[i] for i in range(length) for p in per_class if i < len(p)]
    return np.asarray(order, dtype=np.int64)


# ------------------------------------------------------------------------------------ the models
class SplitImages:
    """Real labelled images served through the generator protocol of ``nodata_defense.synthesis``.

    The full-data reference row runs the very same ``Robustifier.fit`` as the method, only with
    real images of a split in place of synthetic ones: the image for ``(class, shot)`` is the
    ``shot``-th image of that class in the split, found from the per-image seed synthesis derives
    from ``(seed, class name, shot)``.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, class_names: Sequence[str], *, seed: int, name: str
    ) -> None:
        from .synthesis import image_seed

        self.images = images
        self.id = f"nodata-defense/digits-split:{name}"
        digest = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
        self.revision = digest[:16]
        self.settings: dict[str, Any] = {"split": name, "images": int(labels.shape[0])}
        self._by_seed: dict[int, int] = {}
        for label, class_name in enumerate(class_names):
            for shot, index in enumerate(torch.nonzero(labels == label).flatten().tolist()):
                self._by_seed[image_seed(seed, class_name, shot)] = index

    def generate(
        self, prompts: list[str], seeds: list[int], *, guidance_scale: float, num_inference_steps: int
    ) -> Tensor:
        del prompts, guidance_scale, num_inference_steps  # real images: only (class, shot) matters
        missing = [s for s in seeds if s not in self._by_seed]
        if missing:
            raise ValueError(
                f"{self.id}: no image for {len(missing)} requested (class, shot) seed(s); the split holds"
                f" {len(self._by_seed)} images. Ask for at most as many shots per class as it has."
            )
        return self.images[[self._by_seed[s] for s in seeds]]

    def __repr__(self) -> str:
        return f"SplitImages(id={self.id!r}, images={len(self._by_seed)})"


def _directory_digest(path: Path) -> str:
    """sha256 of a diffusers model directory's weights and configs (not of its README or logs)."""
    digest = hashlib.sha256()
    for sub in ("unet", "scheduler", "text_encoder", "tokenizer"):
        for file in sorted((path / sub).rglob("*")) if (path / sub).is_dir() else []:
            if file.is_file():
                digest.update(file.relative_to(path).as_posix().encode() + b"\0")
                with open(file, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
    return digest.hexdigest()


def _sigma_dir(sigma: float) -> str:
    return f"sigma-{sigma:g}"


@dataclass
class DemoContext:
    """What every σ shares: the classifier, the loaded generator, the base denoiser's path and digests."""

    config: DemoConfig
    classifier: torch.nn.Module
    generator_path: Path
    denoiser_path: Path
    denoiser_digest: str
    classifier_digest: str
    generator: Any = None
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def create(cls, config: DemoConfig) -> DemoContext:
        from .zoo import digit_denoiser_path, digit_t2i_path, load_digit_classifier
        from .zoo.models import DIGIT_CNN_DIR

        started = time.perf_counter()
        generator_path = Path(config.generator) if config.generator else digit_t2i_path()
        denoiser_path = Path(config.denoiser) if config.denoiser else digit_denoiser_path()
        for what, path in (("generator", generator_path), ("denoiser", denoiser_path)):
            if not (path / "unet").is_dir():
                raise FileNotFoundError(
                    f"`{what}` {str(path)!r} is not a diffusers model directory (no unet/)."
                )
        classifier = load_digit_classifier()
        digest = hashlib.sha256((DIGIT_CNN_DIR / "model.safetensors").read_bytes()).hexdigest()
        context = cls(
            config=config,
            classifier=classifier,
            generator_path=generator_path.resolve(),
            denoiser_path=denoiser_path.resolve(),
            denoiser_digest=_directory_digest(denoiser_path),
            classifier_digest=digest,
        )
        context.seconds["load"] = time.perf_counter() - started
        return context

    def load_generator(self) -> Any:
        from .config import BUNDLED_T2I_ID
        from .robustifier import load_generator
        from .zoo.models import DIGIT_T2I_DIR

        if self.generator is None:
            bundled = self.config.generator is None and self.generator_path == DIGIT_T2I_DIR.resolve()
            self.generator = load_generator(BUNDLED_T2I_ID if bundled else self.generator_path)
        return self.generator

    def base_denoiser(self) -> DiffusionDenoiser:
        return DiffusionDenoiser.from_pretrained(self.denoiser_path, prompt="", keep_text_encoder=False)

    def references_source(self, kind: str) -> Any:
        if kind == "synthetic":
            return self.load_generator()
        from .zoo import DIGIT_CLASS_NAMES, load_digits

        split = load_digits("classifier")
        return SplitImages(
            split.images, split.labels, DIGIT_CLASS_NAMES, seed=self.config.seed, name="classifier"
        )

    def fingerprint(self, sigma: float, kind: str) -> dict[str, Any]:
        """Everything a fitted model depends on; a cached fit is reused only when all of it matches."""
        config = self.config.robustifier_config(sigma, kind)
        source = self.references_source(kind)
        return {
            "format": _FINGERPRINT_FORMAT,
            "references": kind,
            "fit_config": config.model_dump(mode="json", exclude={"work_dir", "show_progress"}),
            "references_source": {"id": source.id, "revision": source.revision},
            "denoiser_sha256": self.denoiser_digest,
            "classifier_sha256": self.classifier_digest,
        }

    def _references_dir(self, kind: str) -> Path:
        return self.config.work_path / f"references-{kind}"

    def references(self, sigma: float, kind: str, source: Any = None) -> ReferenceSet:
        """The ``kind`` references of the fit at ``sigma``, from the shared cache in ``work_dir``.

        Synthesis is the same at every σ, so it runs once per kind into that cache.
        """
        from .synthesis import synthesize
        from .zoo import DIGIT_CLASS_NAMES

        started = time.perf_counter()
        references = synthesize(
            DIGIT_CLASS_NAMES,
            self.references_source(kind) if source is None else source,
            self.config.robustifier_config(sigma, kind).synthesis.model_copy(
                update={"show_progress": self.config.show_progress}
            ),
            cache_dir=self._references_dir(kind),
        )
        self.seconds[f"references {kind} sigma={sigma:g}"] = time.perf_counter() - started
        return references

    def fitted_dir(self, sigma: float, kind: str) -> Path:
        """Where :meth:`fit` saves the fitted ``RobustModel`` at ``sigma`` on ``kind`` references."""
        return self.config.work_path / _sigma_dir(sigma) / kind / "model"

    def fit(self, sigma: float, kind: str) -> RobustModel:
        """The fitted ``RobustModel`` at ``sigma`` on ``kind`` references, from ``work_dir`` if cached there."""
        from .robustifier import Robustifier
        from .zoo import DIGIT_CLASS_NAMES

        config = self.config
        model_dir = self.fitted_dir(sigma, kind)
        directory = model_dir.parent
        fingerprint_file = directory / "fit.json"
        fingerprint = self.fingerprint(sigma, kind)
        if fingerprint_file.is_file():
            try:
                saved = json.loads(fingerprint_file.read_text(encoding="utf-8"))
            except ValueError:
                saved = None
            if saved != fingerprint:
                # Only this fit's own directory (it holds our fit.json) is removed: stale checkpoints
                # would otherwise be resumed against new weights.
                shutil.rmtree(directory)
            elif (model_dir / "config.json").is_file():
                started = time.perf_counter()
                robust = RobustModel.from_pretrained(model_dir)
                self.seconds[f"load fitted {kind} sigma={sigma:g}"] = time.perf_counter() - started
                return robust
        atomic_write_json(fingerprint_file, fingerprint)
        fit_config = config.robustifier_config(sigma, kind)
        source = self.references_source(kind)
        self.references(sigma, kind, source)
        # Seed the fit's own cache with the shared one (the cache validates every entry, so a copy
        # is always safe).
        if not (directory / "fit" / "references").exists():
            shutil.copytree(self._references_dir(kind), directory / "fit" / "references")

        started = time.perf_counter()
        robust = Robustifier(
            self.classifier,
            DIGIT_CLASS_NAMES,
            generator=source,
            denoiser=str(self.denoiser_path),
            config=fit_config,
        ).fit(work_dir=directory / "fit", show_progress=config.show_progress)
        self.seconds[f"fit {kind} sigma={sigma:g}"] = time.perf_counter() - started
        robust.save_pretrained(model_dir)
        return robust

    def bases(self, sigma: float, rows: Sequence[str]) -> dict[str, Callable[[Tensor], Tensor]]:
        """The base classifier of smoothing of each row at ``sigma`` (noisy images → logits).

        The personalized and full-method rows share one denoiser: certify a chunk with the first,
        then the same chunk with the second, and the second replays the first's denoising
        (:func:`share_denoising`; bit-identical certificates)."""
        fitted = {
            kind: self.fit(sigma, kind)
            for kind in dict.fromkeys(FIT_OF_ROW[r] for r in rows if r in FIT_OF_ROW)
        }
        # A copy: converting the memory format below must not reach the classifier later fits start from.
        classifier = copy.deepcopy(self.classifier) if self.config.channels_last else self.classifier
        out: dict[str, Callable[[Tensor], Tensor]] = {}
        for row in rows:
            if row == "gaussian":
                out[row] = classifier
            elif row == "denoiser":
                out[row] = DenoisedClassifier(self.base_denoiser(), classifier, sigma)
            elif row == "personalized":
                # The personalized denoiser of the method's fit in front of the original classifier.
                out[row] = DenoisedClassifier(fitted["synthetic"].denoiser, classifier, sigma)
            elif row == "full_method":
                out[row] = fitted["synthetic"].base_classifier(sigma)
            else:
                out[row] = fitted["full_data"].base_classifier(sigma)
        if self.config.channels_last:
            # Only the memory layout changes; the models are the demo's own (loaded or fitted here).
            for base in out.values():
                base.to(memory_format=torch.channels_last)
        return share_denoising(out, capacity=chunk_batches(self.config))


class _ReplayedDenoiser(nn.Module):
    """A denoiser that keeps its outputs for inputs it may see again, each output returned once.

    Two rows that denoise the same noisy batches (same noise seed per chunk) with it run it once per
    batch. The key is a SHA-256 of the input's bytes, shape and dtype; the denoiser is deterministic
    in eval mode, so a replayed output is the one it would compute. At most ``capacity`` outputs are
    kept (the oldest go first), which bounds memory when a replay never comes (a resumed cell); with
    fewer than a chunk's batches, replays are lost, which costs time and changes no result."""

    def __init__(self, denoiser: nn.Module, sigma: float, capacity: int) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.sigma = sigma
        self.capacity = capacity
        self.kept: OrderedDict[bytes, Tensor] = OrderedDict()

    def forward(self, x_noisy: Tensor) -> Tensor:
        digest = hashlib.sha256(x_noisy.detach().cpu().contiguous().numpy().tobytes())
        digest.update(repr((tuple(x_noisy.shape), str(x_noisy.dtype))).encode())
        key = digest.digest()
        if key in self.kept:
            return self.kept.pop(key)
        out = self.denoiser(x_noisy, self.sigma)
        self.kept[key] = out
        while len(self.kept) > self.capacity:
            self.kept.popitem(last=False)
        return out


class _ReplayedDenoisedClassifier(nn.Module):
    def __init__(self, denoiser: _ReplayedDenoiser, classifier: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier

    def forward(self, x_noisy: Tensor) -> Tensor:
        return self.classifier(self.denoiser(x_noisy))


def share_denoising(bases: dict[str, Any], capacity: int) -> dict[str, Any]:
    """``bases`` with the personalized and full-method rows denoising once for both.

    They share the method's personalized denoiser and (certify_chunk) the noise of each chunk, so
    their certificates are bit-identical to unshared ones; only the classifiers behind differ. The
    second row must certify a chunk before ``capacity`` other batches have been denoised."""
    first, second = bases.get("personalized"), bases.get("full_method")
    if first is None or second is None:
        return bases
    if first.denoiser is not second.denoiser or first.sigma != second.sigma:
        return bases
    shared = _ReplayedDenoiser(first.denoiser, first.sigma, capacity)
    return {
        **bases,
        "personalized": _ReplayedDenoisedClassifier(shared, first.classifier),
        "full_method": _ReplayedDenoisedClassifier(shared, second.classifier),
    }


def chunk_seed(seed: int, sigma: float, start: int) -> int:
    """Noise seed of the chunk of test images starting at ``start``: the same for every row."""
    digest = hashlib.sha256(f"demo-noise:{seed}:{sigma!r}:{start}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def chunk_size(config: DemoConfig) -> int:
    """Images certified per smoothing call (enough samples per call to fill the batches)."""
    return max(1, _SAMPLES_PER_CHUNK // (config.n0 + config.n))


def chunk_batches(config: DemoConfig) -> int:
    """Noise batches the base classifier sees per chunk: the selection draws, then the estimation
    draws, each packed across the chunk's images into batches of ``batch_size``."""
    images = chunk_size(config)
    return math.ceil(images * config.n0 / config.batch_size) + math.ceil(
        images * config.n / config.batch_size
    )


def certify_chunk(
    row: str,
    base: Callable[[Tensor], Tensor],
    sigma: float,
    images: Tensor,
    labels: Tensor,
    indices: Sequence[int],
    start: int,
    config: DemoConfig,
) -> list[CertificateRecord]:
    """Certify one chunk of test images with the smoothing core; ``start`` fixes the noise seed."""
    smoothed = SmoothedClassifier(base, 10, sigma)
    certificates = smoothed.certify(
        images,
        n0=config.n0,
        n=config.n,
        alpha=config.alpha,
        batch_size=config.batch_size,
        generator=chunk_seed(config.seed, sigma, start),
    )
    return [
        CertificateRecord(
            row=row,
            sigma=sigma,
            index=int(index),
            label=int(label),
            prediction=int(c.label),
            radius=float(c.radius) if c.label != ABSTAIN else 0.0,
            pa_lower=float(c.pa_lower),
            count=int(c.count),
        )
        for c, label, index in zip(certificates, labels.tolist(), indices, strict=True)
    ]


# ----------------------------------------------------------------------------------------- outputs
def plot_curves(
    accuracy: Mapping[str, Mapping[float, Sequence[float]]],
    radii: Sequence[float],
    sigmas: Sequence[float],
    rows: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str = "",
) -> Path:
    """PNG of certified accuracy vs radius: one panel per σ, one line per row (atomic write)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the certified-accuracy plot needs matplotlib; install it with `pip install nodata-defense[demo]`."
        ) from error

    # A bare Figure (no pyplot) leaves the user's matplotlib backend and state alone.
    figure = Figure(figsize=(max(6.0, 4.0 * len(sigmas)), 4.2), layout="constrained")
    axes = figure.subplots(1, len(sigmas), sharey=True, squeeze=False)[0]
    markers = {"gaussian": "o", "denoiser": "s", "personalized": "^", "full_method": "D", "full_data": "x"}
    styles = {"full_data": "--"}
    for ax, sigma in zip(axes, sigmas, strict=True):
        for row in rows:
            values = accuracy.get(row, {}).get(sigma)
            if values is None:
                continue
            ax.plot(
                list(radii),
                [100 * v for v in values],
                marker=markers[row],
                linestyle=styles.get(row, "-"),
                label=ROW_TITLES[row],
            )
        ax.set_title(f"σ = {sigma:g}")
        ax.set_xlabel("ℓ2 radius r")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("certified accuracy (%)")
    legend: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:
        figure.legend(
            list(legend.values()),
            list(legend),
            loc="outside lower center",
            ncols=min(2 if len(sigmas) == 1 else 3, len(legend)),  # one panel is too narrow for 3
            fontsize=8,
        )
    if title:
        figure.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return atomic_write_bytes(path, buffer.getvalue())


def write_tsv(records: Iterable[CertificateRecord], path: str | os.PathLike) -> Path:
    lines = ["\t".join(TSV_COLUMNS)] + [r.tsv() for r in records]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_tsv(path: str | os.PathLike) -> list[CertificateRecord]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t") != list(TSV_COLUMNS):
        raise ValueError(f"{str(path)!r} is not a certificates TSV (expected the header {TSV_COLUMNS}).")
    return [CertificateRecord.from_tsv(line) for line in lines[1:] if line.strip()]


def accuracy_table(
    records: Iterable[CertificateRecord], config: DemoConfig
) -> tuple[dict[str, dict[float, tuple[float, ...]]], dict[tuple[str, float], int]]:
    """Certified accuracy per row and σ from ``records``, and the number of images behind each cell."""
    groups: dict[tuple[str, float], list[CertificateRecord]] = {}
    for record in records:
        groups.setdefault((record.row, record.sigma), []).append(record)
    accuracy: dict[str, dict[float, tuple[float, ...]]] = {}
    for (row, sigma), group in groups.items():
        accuracy.setdefault(row, {})[sigma] = certified_accuracy(group, config.radii)
    return accuracy, {key: len(group) for key, group in groups.items()}


def summary(
    accuracy: Mapping[str, Mapping[float, Sequence[float]]],
    counts: Mapping[tuple[str, float], int],
    records: Sequence[CertificateRecord],
    config: DemoConfig,
    seconds: Mapping[str, float],
    **extra: Any,
) -> dict[str, Any]:
    """The JSON summary: certified accuracy per row × σ × radius, settings, seconds, versions."""
    rows = {}
    for row in config.rows:
        per_sigma = {}
        for sigma in config.sigmas:
            values = accuracy.get(row, {}).get(sigma)
            if values is None:
                continue
            group = [r for r in records if r.row == row and r.sigma == sigma]
            per_sigma[f"{sigma:g}"] = {
                "radii": list(config.radii),
                "certified_accuracy": list(values),
                "images": counts.get((row, sigma), 0),
                "abstained": sum(r.prediction == ABSTAIN for r in group),
                "mean_radius_correct": (
                    float(np.mean([r.radius for r in group if r.correct]))
                    if any(r.correct for r in group)
                    else 0.0
                ),
            }
        rows[row] = {"title": ROW_TITLES[row], "sigmas": per_sigma}
    return {
        "rows": rows,
        "settings": config.model_dump(mode="json"),
        "seconds": {k: round(float(v), 2) for k, v in seconds.items()},
        "versions": {**library_versions(), "python": sys.version.split()[0], "numpy": np.__version__},
        "torch_threads": torch.get_num_threads(),
        **extra,
    }


# -------------------------------------------------------------------------------------- the demo
def run_demo(config: DemoConfig | Mapping[str, Any] | None = None) -> DemoResult:
    """Fit (or load from ``work_dir``), certify every row at every σ, write the outputs, return them."""
    if config is None:
        config = DemoConfig()
    elif isinstance(config, Mapping):
        config = DemoConfig.model_validate(dict(config))
    elif not isinstance(config, DemoConfig):
        raise TypeError(
            f"`config` must be a DemoConfig, a dict of its fields or None; got {type(config).__name__}."
        )
    from .zoo import load_digits

    started = time.perf_counter()
    context = DemoContext.create(config)
    seconds = context.seconds
    test = load_digits("test")
    order = stratified_order()[: config.n_test]
    images, labels = test.images[order], test.labels[order]
    size = chunk_size(config)
    records: list[CertificateRecord] = []
    for sigma in config.sigmas:
        bases = context.bases(sigma, config.rows)
        # Chunk by chunk, every row in turn: the full-method row then replays the chunk's denoising
        # that the personalized row has just done (see DemoContext.bases).
        by_row: dict[str, list[CertificateRecord]] = {row: [] for row in config.rows}
        spent = dict.fromkeys(config.rows, 0.0)
        with tqdm(
            total=len(order) * len(config.rows),
            desc=f"certify {len(config.rows)} rows σ={sigma:g}",
            unit="img",
            disable=not config.show_progress,
        ) as bar:
            for start in range(0, len(order), size):
                stop = min(start + size, len(order))
                for row in config.rows:
                    begin = time.perf_counter()
                    by_row[row] += certify_chunk(
                        row,
                        bases[row],
                        sigma,
                        images[start:stop],
                        labels[start:stop],
                        order[start:stop],
                        start,
                        config,
                    )
                    spent[row] += time.perf_counter() - begin
                    bar.update(stop - start)
        for row in config.rows:
            records += by_row[row]
            seconds[f"certify {row} sigma={sigma:g}"] = spent[row]
        del bases
    seconds["total"] = time.perf_counter() - started

    accuracy, counts = accuracy_table(records, config)
    out = Path(config.out_dir)
    files = {
        "tsv": write_tsv(records, out / "certificates.tsv"),
        "json": out / "summary.json",
        "png": out / "certified_accuracy.png",
    }
    atomic_write_json(
        files["json"],
        summary(
            accuracy,
            counts,
            records,
            config,
            seconds,
            test_split={"name": "test", "indices": order.tolist(), "order_seed": TEST_ORDER_SEED},
            denoiser={"path": str(context.denoiser_path), "sha256": context.denoiser_digest},
            generator={"path": str(context.generator_path)},
        ),
    )
    plot_curves(
        accuracy,
        config.radii,
        config.sigmas,
        config.rows,
        files["png"],
        title=f"digits demo: {config.n_test} test images, N0={config.n0}, N={config.n}, α={config.alpha:g}",
    )
    return DemoResult(
        config=config, accuracy=accuracy, records=tuple(records), seconds=dict(seconds), files=files
    )


def argument_parser() -> argparse.ArgumentParser:
    """The demo's command-line options (``benchmarks/quality.py`` extends them)."""
    d = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="nodata-defense demo",
        description="The offline digits demo: robustify the bundled digit classifier from its class names only"
        " and certify real test digits, against Gaussian smoothing, an off-the-shelf denoiser and a full-data"
        " reference. Defaults are sized to finish within 10 minutes on 2 CPU cores (measured: docs/demo.md).",
    )
    a = parser.add_argument
    a("--sigmas", type=float, nargs="+", default=list(d.sigmas), help="noise levels (default: %(default)s)")
    a("--rows", nargs="+", choices=ROWS, default=list(d.rows), help="rows to run (default: all five)")
    a("--n-test", type=int, default=d.n_test, help="test images (default: %(default)s)")
    a("--n0", type=int, default=d.n0, help="selection samples (default: %(default)s)")
    a("--n", type=int, default=d.n, help="estimation samples (default: %(default)s)")
    a("--alpha", type=float, default=d.alpha, help="failure probability (default: %(default)s)")
    a("--batch-size", type=int, default=d.batch_size, help="noisy samples per forward pass")
    a(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="keep the default memory format (channels_last is faster on a CPU)",
    )
    a("--radii", type=float, nargs="+", default=list(d.radii), help="radii of the table")
    a(
        "--shots",
        type=int,
        default=d.shots_per_class,
        help="synthetic references per class (default: %(default)s)",
    )
    a("--synthesis-steps", type=int, default=d.synthesis_steps, help="DDIM steps of synthesis")
    a("--guidance", type=float, default=None, help="guidance scale (default: 7 for 1 shot, else 4)")
    a("--steps", type=int, default=d.personalize_steps, help="personalization steps (default: %(default)s)")
    a("--personalize-batch-size", type=int, default=d.personalize_batch_size)
    a("--personalize-lr", type=float, default=d.personalize_lr)
    a("--lora-rank", type=int, default=d.lora_rank)
    a("--classifier-weight", type=float, default=d.classifier_weight, help="lambda of personalization")
    a("--adapt-mode", choices=("full", "lora", "head", "none"), default=d.adapt_mode)
    a("--adapt-epochs", type=int, default=d.adapt_epochs)
    a("--adapt-lr", type=float, default=d.adapt_lr)
    a(
        "--full-data-per-class",
        type=int,
        default=d.full_data_per_class,
        help="real references per class of the full-data row (default: %(default)s; 200 = all of C)",
    )
    a("--seed", type=int, default=d.seed)
    a("--out-dir", default=d.out_dir, help="output directory (default: %(default)s)")
    a("--work-dir", default=None, help="fitted models and references (default: OUT_DIR/work)")
    a("--generator", default=None, help="text-to-image model directory (default: bundled digits-t2i)")
    a("--denoiser", default=None, help="denoiser directory (default: bundled digits-denoiser)")
    a("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a("--quiet", action="store_true", help="no progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(
        sigmas=tuple(args.sigmas),
        rows=tuple(args.rows),
        n_test=args.n_test,
        n0=args.n0,
        n=args.n,
        alpha=args.alpha,
        batch_size=args.batch_size,
        channels_last=args.channels_last,
        radii=tuple(args.radii),
        shots_per_class=args.shots,
        synthesis_steps=args.synthesis_steps,
        guidance_scale=args.guidance,
        personalize_steps=args.steps,
        personalize_batch_size=args.personalize_batch_size,
        personalize_lr=args.personalize_lr,
        lora_rank=args.lora_rank,
        classifier_weight=args.classifier_weight,
        adapt_mode=args.adapt_mode,
        adapt_epochs=args.adapt_epochs,
        adapt_lr=args.adapt_lr,
        full_data_per_class=args.full_data_per_class,
        seed=args.seed,
        out_dir=args.out_dir,
        work_dir=args.work_dir,
        generator=args.generator,
        denoiser=args.denoiser,
        show_progress=not args.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``nodata-defense demo [options]``: run the demo, print the table and where the outputs are."""
    parser = argument_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        config = config_from_args(args)
    except ValidationError as error:
        parser.error("; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors()))
    result = run_demo(config)
    print()
    print(
        f"Certified accuracy (%) on {config.n_test} test digits (N0={config.n0}, N={config.n}, α={config.alpha:g});"
        " a row counts an image at radius r when its certificate is correct with radius >= r."
    )
    print(result.table())
    print(f"wall-clock: {result.seconds['total']:.0f} s")
    for name, path in result.files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
