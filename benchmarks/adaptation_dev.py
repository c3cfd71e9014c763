"""How the classifier-adaptation learning rate of the digits demo was chosen: a sweep on dev digits.

    python benchmarks/adaptation_dev.py                  # sigma 0.25, 0.5, 1.0; about 15 min on 2 cores

For each σ it takes the self-personalized denoiser of the quality benchmark's fit (cached in
``runs/quality-work``, fitted there when missing), adapts ``digits-cnn`` on the denoised synthetic
references at each learning rate of ``--learning-rates`` (everything else as the demo's recipe,
except that the denoiser comes from the quality benchmark's 500 personalization steps, not the
demo's 200),
and measures on **dev digits**: test-order positions 500–1,499 of the split T, which neither the
demo (positions 0–99) nor the quality benchmark (0–499) certifies. Two numbers per variant:

- one-shot accuracy under noise: the fraction of (dev digit, noise draw) pairs, 4 draws per digit,
  that denoise-then-classify labels correctly. It estimates the mean of pA, the quantity that
  certification turns into radii;
- clean accuracy of the adapted classifier on the dev digits (how much of its knowledge is kept).

The first two rows of each σ are the references: the off-the-shelf denoiser and the personalized
denoiser in front of the original classifier (no adaptation). Writes
``benchmarks/results/adaptation_dev.json`` and its section of ``docs/demo.md``.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from _report import cpu_name, write_section

from nodata_defense._io import atomic_write_json
from nodata_defense.adapt import adapt_classifier
from nodata_defense.demo import DemoContext, config_from_args, stratified_order
from nodata_defense.denoiser import DenoisedClassifier
from nodata_defense.zoo import load_digits

ROOT = Path(__file__).resolve().parents[1]
DEV_POSITIONS = (500, 1500)
DRAWS = 4
BATCH = 250


def noisy_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, sigma: float) -> float:
    """Percent of (image, noise draw) pairs labelled correctly; the same draws for every model."""
    generator = torch.Generator().manual_seed(0)
    correct = 0
    with torch.inference_mode():
        for _ in range(DRAWS):
            for i in range(0, len(images), BATCH):
                batch = images[i : i + BATCH]
                noisy = batch + sigma * torch.randn(batch.shape, generator=generator)
                correct += int((model(noisy).argmax(1) == labels[i : i + BATCH]).sum())
    return 100 * correct / (DRAWS * len(images))


def clean_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.inference_mode():
        return 100 * float((model(images).argmax(1) == labels).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/adaptation_dev.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-5, 3e-5, 5e-5, 1e-4])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "adaptation_dev.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "demo.md")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import quality  # the quality benchmark's settings and fit cache

    config = config_from_args(quality.parse_args(["--quiet"]))
    context = DemoContext.create(config)
    test = load_digits("test")
    dev = stratified_order()[DEV_POSITIONS[0] : DEV_POSITIONS[1]]
    images, labels = test.images[dev], test.labels[dev]
    classifier = context.classifier
    original_clean = clean_accuracy(classifier, images, labels)
    rows = []
    for sigma in args.sigmas:
        fitted = context.fit(sigma, "synthetic")
        fit_config = config.robustifier_config(sigma, "synthetic")
        references = context.references(sigma, "synthetic")
        for name, model in (
            ("off-the-shelf denoiser", DenoisedClassifier(context.base_denoiser(), classifier, sigma)),
            ("personalized denoiser, no adaptation", DenoisedClassifier(fitted.denoiser, classifier, sigma)),
        ):
            rows.append(
                {
                    "sigma": sigma,
                    "variant": name,
                    "learning_rate": None,
                    "noisy_accuracy": noisy_accuracy(model, images, labels, sigma),
                    "clean_accuracy": original_clean,
                }
            )
            print(rows[-1], flush=True)
        for lr in args.learning_rates:
            started = time.perf_counter()
            adapt = fit_config.adapt.model_copy(update={"learning_rate": lr})
            adapted = adapt_classifier(
                classifier, fitted.denoiser, references, sigma, adapt
            ).classifier.eval()
            rows.append(
                {
                    "sigma": sigma,
                    "variant": f"+ adaptation, lr {lr:g}",
                    "learning_rate": lr,
                    "noisy_accuracy": noisy_accuracy(
                        DenoisedClassifier(fitted.denoiser, adapted, sigma), images, labels, sigma
                    ),
                    "clean_accuracy": clean_accuracy(adapted, images, labels),
                    "seconds": time.perf_counter() - started,
                }
            )
            print(rows[-1], flush=True)

    command = "python benchmarks/adaptation_dev.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv or sys.argv[1:])
    )
    result = {
        "command": command,
        "dev_positions": list(DEV_POSITIONS),
        "draws_per_image": DRAWS,
        "recipe": {
            "mode": config.adapt_mode,
            "epochs": config.adapt_epochs,
            "shots_per_class": config.shots_per_class,
            "personalize_steps": config.personalize_steps,
            "demo_learning_rate": config.adapt_lr,
        },
        "machine": {"cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__},
        "rows": rows,
    }
    atomic_write_json(args.json, result)
    lines = [
        "### How the adaptation learning rate was chosen",
        "",
        f"Command: `{command}` (results in `benchmarks/results/adaptation_dev.json`). On"
        f" {DEV_POSITIONS[1] - DEV_POSITIONS[0]:,} dev digits (test-order positions {DEV_POSITIONS[0]:,}–"
        f"{DEV_POSITIONS[1] - 1:,}, never certified by the demo or the quality benchmark), {DRAWS} noise draws each:"
        " one-shot accuracy (%) of denoise-then-classify under noise, and the clean accuracy (%) of the"
        f" classifier it uses. Adaptation: `{config.adapt_mode}`, {config.adapt_epochs} epochs on"
        f" {config.shots_per_class} synthetic references per class, after {config.personalize_steps}"
        " personalization steps.",
        "",
        "| σ | variant | accuracy under noise | clean accuracy |",
        "|---|---|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['sigma']:g} | {row['variant']} | {row['noisy_accuracy']:.1f} | {row['clean_accuracy']:.1f} |"
        )
    write_section(args.markdown, "adaptation_dev", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
