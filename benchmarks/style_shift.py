"""The digits demo with models of another style: printed digits instead of handwritten ones.

The bundled generator (``digits-t2i``) and off-the-shelf denoiser (``digits-denoiser``) learned
handwritten digits (the split G), the same kind of image as the classifier's own data. Here two
models of the same two architectures are trained only on printed digits rendered from fonts
(``scripts/printed_digits.py``): a generator and a denoiser whose images differ in style from the
classifier's data, as IF's web images differ from ImageNet in the paper. The demo's rows run on the
same test digits at the demo's settings and at the sizes of the published run (``SIZES``); the same
demo with the bundled (handwritten) models, run here at the same settings, is the comparison.

    python scripts/train_digit_t2i.py --style printed --out runs/digits-t2i-printed/model --run-dir runs/digits-t2i-printed
    python scripts/train_digit_t2i.py --style printed --out runs/digits-denoiser-printed/model --run-dir runs/digits-denoiser-printed --channels 8 16 32
    python benchmarks/style_shift.py

Writes ``benchmarks/results/style_shift.json``, the demo's outputs in
``benchmarks/results/style_shift/`` and the section between the ``style_shift`` markers of
``docs/demo.md``. Fitted models are kept in ``--work-dir``, so a re-run only certifies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _report import cpu_name, reproducing_arguments, write_section
from quality import class_breakdown, findings, paired_comparison

from nodata_defense._io import atomic_write_json
from nodata_defense.demo import ROW_TITLES, DemoConfig, accuracy_table, read_tsv, run_demo
from nodata_defense.zoo.models import DIGIT_T2I_DIR, WEIGHTS_DIR

ROOT = Path(__file__).resolve().parent.parent
# The sizes the published run was made with: the demo's defaults until 2026-12-03, when the demo's
# were halved to keep it under 10 minutes on a slower 2-core machine.
SIZES = {"n_test": 100, "full_data_per_class": 100}
TRAIN_COMMANDS = (
    "python scripts/train_digit_t2i.py --style printed --out runs/digits-t2i-printed/model"
    " --run-dir runs/digits-t2i-printed",
    "python scripts/train_digit_t2i.py --style printed --out runs/digits-denoiser-printed/model"
    " --run-dir runs/digits-denoiser-printed --channels 8 16 32",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generator", type=Path, default=ROOT / "runs" / "digits-t2i-printed" / "model")
    p.add_argument("--denoiser", type=Path, default=ROOT / "runs" / "digits-denoiser-printed" / "model")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument(
        "--rows",
        nargs="+",
        default=["denoiser", "personalized", "full_method", "full_data"],
        choices=list(ROW_TITLES),
    )
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "style_shift")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "style-shift-work")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "style_shift.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "demo.md")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the report from the certificates of the last run in --out-dir (same settings)",
    )
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def _generator_evaluation(model: Path) -> dict[str, Any]:
    """What the training script measured of the model with the bundled (handwritten) classifier."""
    log = model / "training_log.json"
    return json.loads(log.read_text(encoding="utf-8")).get("evaluation", {}) if log.is_file() else {}


def _training_seconds(model: Path) -> float | None:
    """Training time the training script logged for the model (its last session), if it did."""
    log = model / "training_log.json"
    return (
        json.loads(log.read_text(encoding="utf-8")).get("train_seconds_this_session")
        if log.is_file()
        else None
    )


def _classifier_on_printed(per_class: int = 100, seed: int = 1) -> dict[str, Any]:
    """How well the bundled classifier reads printed digits (drawn apart from the training images,
    whose seed is 0): how far apart the two styles are, seen from the classifier."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from printed_digits import render_printed_digits
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from nodata_defense.zoo import load_digit_classifier, load_digits

    classifier = load_digit_classifier().eval()
    printed = render_printed_digits(per_class, seed=seed)
    test = load_digits("test")
    with torch.inference_mode():
        on_printed = (classifier(printed.images).argmax(1) == printed.labels).float().mean()
        on_test = (classifier(test.images).argmax(1) == test.labels).float().mean()
    return {
        "printed_images": len(printed),
        "printed_accuracy": float(on_printed),
        "test_accuracy": float(on_test),
    }


def _differing(settings: dict[str, Any], made_with: dict[str, Any], ignored: set[str]) -> list[str]:
    """The settings, other than ``ignored``, in which a recorded run differs from this one."""
    return sorted(k for k in settings if k not in ignored and made_with.get(k) != settings[k])


def in_domain_config(config: DemoConfig) -> DemoConfig:
    """The printed run's settings with the bundled (handwritten) generator and denoiser, writing beside
    it: the comparison holds because nothing else differs."""
    return config.model_copy(
        update={
            "generator": None,
            "denoiser": None,
            "out_dir": str(Path(config.out_dir) / "in-domain"),
            "work_dir": str(Path(config.work_path) / "in-domain"),
        }
    )


def render(result: dict[str, Any]) -> str:
    settings, radii = result["settings"], result["settings"]["radii"]
    header = " | ".join(f"r = {r:g}" for r in radii)
    lines = [
        f"Measured {result['measured_at_utc']} UTC on `{result['machine']['cpu']}` (torch"
        f" {result['machine']['torch']}, {result['machine']['torch_threads']} thread(s)): {settings['n_test']} test"
        f" digits, N0 = {settings['n0']}, N = {settings['n']}, α = {settings['alpha']:g}, the demo's fit settings."
        " Certified accuracy (%); *handwritten* is the bundled generator and denoiser (the in-domain demo at"
        " the same settings), *printed* the two models of the same sizes trained on rendered fonts only:",
        "",
        f"| σ | row | generator | {header} |",
        "|---|---|---|" + "---:|" * len(radii),
    ]
    for sigma in settings["sigmas"]:
        key = f"{sigma:g}"
        for row in settings["rows"]:
            for name, table in (("handwritten", result["in_domain"]), ("printed", result["printed"])):
                values = table.get(row, {}).get(key)
                if values is not None:
                    cells = " | ".join(f"{100 * v:.0f}" for v in values)
                    lines.append(f"| {key} | {ROW_TITLES[row]} | {name} | {cells} |")
    if result.get("findings"):
        lines += ["", "Key comparisons, printed models:", ""] + [f"- {line}" for line in result["findings"]]
    reading = result["classifier_on_printed"]
    lines += [
        "",
        f"The bundled classifier reads {100 * reading['printed_accuracy']:.1f} % of {reading['printed_images']:,}"
        f" printed digits correctly (rendered with another seed than the training images), against"
        f" {100 * reading['test_accuracy']:.1f} % of the handwritten test digits.",
    ]
    for name, evaluation in result["generator_evaluation"].items():
        if evaluation:
            lines += [
                "",
                f"The {name} generator as its training script measured it with the bundled classifier:"
                f" {_describe_evaluation(evaluation)}.",
            ]
    comparisons = [c for c in result["paired_comparisons"] if (c["a"], c["b"]) == ("full_method", "denoiser")]
    if comparisons:
        lines += [
            "",
            "Printed generator, full method vs off-the-shelf denoiser on the same digits (only A / only B"
            " certified correctly with radius ≥ r; exact two-sided sign test):",
            "",
            "| σ | r | full method (%) | off-the-shelf (%) | only full method | only off-the-shelf | p |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for c in comparisons:
            lines.append(
                f"| {c['sigma']:g} | {c['radius']:g} | {c['a_percent']:.0f} | {c['b_percent']:.0f} | {c['only_a']}"
                f" | {c['only_b']} | {c['p_value']:.2g} |"
            )

    def took(style: str) -> str | None:
        seconds = (result.get("training_seconds") or {}).get(style) or {}
        if seconds.get("generator") is None or seconds.get("denoiser") is None:
            return None
        return f"{seconds['generator']:,.0f} s and {seconds['denoiser']:,.0f} s"

    logged = [f"{style} {took(style)}" for style in ("printed", "handwritten") if took(style)]
    trained = f" (training logs: {'; '.join(logged)})" if logged else ""
    lines += [
        "",
        "Reproduce: "
        + " and ".join(f"`{c}`" for c in TRAIN_COMMANDS)
        + trained
        + f", then `{result['command']}`"
        f" ({result['seconds'] / 60:.0f} minutes here, fits included).",
    ]
    return "\n".join(lines)


def _describe_evaluation(evaluation: dict[str, Any]) -> str:
    parts = [
        f"its samples for “{cell['template']}” are classified as the prompted digit"
        f" {100 * cell['classifier_accuracy']:.1f} % of the time"
        for cell in evaluation.get("generation", {}).values()
    ]
    parts += [
        f"at σ = {sigma} one-shot denoising of the test digits gives {100 * cell['accuracy_denoised']:.1f} %"
        f" accuracy ({100 * cell['accuracy_noisy']:.1f} % without denoising)"
        for sigma, cell in evaluation.get("denoising", {}).items()
    ]
    return "; ".join(parts)


def _previous_run(args: argparse.Namespace, settings: dict[str, Any]) -> tuple[list, dict[str, Any]] | None:
    """The certificates of the last run, where and when it ran and its in-domain table, if it was made
    with these settings."""
    tsv, summary = args.out_dir / "certificates.tsv", args.out_dir / "summary.json"
    if not (tsv.is_file() and summary.is_file() and args.json.is_file()):
        print(
            f"--report-only: no earlier run in {args.out_dir} (and {args.json}); run without it",
            file=sys.stderr,
        )
        return None
    made_with = json.loads(summary.read_text(encoding="utf-8"))["settings"]
    differ = _differing(settings, made_with, {"show_progress"})
    if differ:
        print(
            f"--report-only: the run in {args.out_dir} was made with other settings ({', '.join(differ)})",
            file=sys.stderr,
        )
        return None
    previous = json.loads(args.json.read_text(encoding="utf-8"))
    return read_tsv(tsv), {
        key: previous[key] for key in ("seconds", "measured_at_utc", "machine", "in_domain")
    }


def _by_sigma_key(accuracy: dict[str, dict[float, Any]]) -> dict[str, dict[str, list[float]]]:
    """An accuracy table as JSON: rows, then σ written as in the demo's summary ("0.25", "1")."""
    return {
        row: {f"{sigma:g}": list(values) for sigma, values in by_sigma.items()}
        for row, by_sigma in accuracy.items()
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [path for path in (args.generator, args.denoiser) if not (path / "unet").is_dir()]
    if missing:
        commands = "\n  ".join(TRAIN_COMMANDS)
        print(f"no printed-digit model at {missing[0]}; train them first:\n  {commands}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = DemoConfig(
        sigmas=tuple(args.sigmas),
        rows=tuple(args.rows),
        generator=str(args.generator),
        denoiser=str(args.denoiser),
        out_dir=str(args.out_dir),
        work_dir=str(args.work_dir),
        show_progress=not args.quiet,
        **SIZES,
    )
    settings = config.model_dump(mode="json")
    if args.report_only:
        previous = _previous_run(args, settings)
        if previous is None:
            return 2
        records, measured = previous
    else:
        started = time.perf_counter()
        records = list(run_demo(config).records)
        measured = {
            "seconds": round(time.perf_counter() - started, 1),
            "measured_at_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "machine": {
                "cpu": cpu_name(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
            },
        }
        in_domain, _ = accuracy_table(list(run_demo(in_domain_config(config)).records), config)
        measured["in_domain"] = _by_sigma_key(in_domain)
    accuracy, _ = accuracy_table(records, config)
    cells: dict[tuple[str, float], list] = {}
    for record in records:
        cells.setdefault((record.row, record.sigma), []).append(record)
    comparisons = paired_comparison(cells, config)
    argv_shown = sys.argv[1:] if argv is None else argv
    result = {
        "command": " ".join(
            [
                "python benchmarks/style_shift.py",
                *reproducing_arguments(argv_shown, valued=("--threads",), flags=("--quiet", "--report-only")),
            ]
        ),
        **measured,
        "settings": {**settings, "generator": "printed", "denoiser": "printed"},
        "printed": _by_sigma_key(accuracy),
        "generator_evaluation": {
            "handwritten": _generator_evaluation(DIGIT_T2I_DIR),
            "printed": _generator_evaluation(args.generator),
        },
        "training_seconds": {
            "printed": {
                "generator": _training_seconds(args.generator),
                "denoiser": _training_seconds(args.denoiser),
            },
            "handwritten": {
                "generator": _training_seconds(DIGIT_T2I_DIR),
                "denoiser": _training_seconds(WEIGHTS_DIR / "digits-denoiser"),
            },
        },
        "paired_comparisons": comparisons,
        "findings": findings(cells, comparisons, class_breakdown(cells, config)),
        "classifier_on_printed": _classifier_on_printed(),
    }
    atomic_write_json(args.json, result)
    report = render(result)
    write_section(args.markdown, "style_shift", report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
