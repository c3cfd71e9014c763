"""Quality benchmark: the digits demo's five rows at the paper's certification settings.

    python benchmarks/quality.py                      # N = 10,000, N0 = 100, alpha = 0.001, 500 test digits
    python benchmarks/quality.py --max-minutes 60     # stop cleanly after about an hour; re-run to continue

The same comparison as ``nodata-defense demo`` (docs/demo.md) — Gaussian smoothing, off-the-shelf
denoiser, self-personalized denoiser, full method, full-data reference — with the paper's settings
(Carlini et al. 2023 / Choi et al. 2024: N = 10,000, N0 = 100, alpha = 0.001, 500 test images,
500 personalization steps). It runs for days on 2 CPU cores, so it is resumable at every level:

- fitted models are cached in ``--work-dir`` (default ``runs/quality-work``) with a fingerprint of
  what they depend on, and each fitted model (under 1 MB) is also kept beside the certificates
  (``--out-dir``/fits, committed with them): a run whose work directory is gone starts from that
  copy instead of fitting again, because a refit on another CPU need not be bit-identical (measured:
  it was not, on 2026-12-03) and would have to start its cells again;
- each cell records the sha256 of the fitted weights that made its certificates, and refuses to
  continue with others (a fit redone after the work directory was lost need not be bit-identical);
  a cell from before that was recorded is checked by certifying its first chunk again;
- certificates are appended, chunk by chunk, to one TSV per row and σ in ``--out-dir``
  (default ``benchmarks/results/quality/``), with that cell's settings and measured seconds in a
  JSON file beside it, each rewrite atomic; a re-run skips what is there;
- work goes chunk-major (every row and σ gets chunk k before any gets chunk k + 1), so a partial run
  compares the rows on the same images;
- ``--max-minutes`` stops after the chunk in progress;
- the personalized and full-method rows put the same denoiser in front of two classifiers and see
  the same noise, so the second reuses the first's denoised batches: bit-identical results, and the
  full-method row costs about what the plain-classifier row does (each cell's ``latest_run`` in its
  JSON file has the measured seconds).

Only the process that certifies a cell writes its files, so the σ values can run in parallel
processes; on a 2-core machine two single-threaded processes certify more per hour than one
process with two threads, because a batch of 250 small digits does not keep two threads busy::

    python benchmarks/quality.py --sigmas 0.25 --threads 1 &
    python benchmarks/quality.py --sigmas 0.5 --threads 1 &
    wait; python benchmarks/quality.py --max-minutes 0     # the report, once every σ has ended

Every stop writes a report over every σ with certificates in ``--out-dir`` made with the same
settings (``--sigmas`` bounds the work, not the report; each parallel process reads the others'
cells as they are when it ends, so the last command above makes sure the report has every
certificate): ``benchmarks/results/quality.json`` (certified accuracy per row × σ × radius,
images per cell, measured seconds per image, estimated time to finish, settings, versions),
``benchmarks/results/quality.png`` and ``docs/quality.md`` (the table and the command).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _report import reproducing_arguments, write_section
from pydantic import ValidationError
from safetensors import safe_open
from tqdm.auto import tqdm

from nodata_defense._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from nodata_defense.demo import (
    FIT_OF_ROW,
    ROW_TITLES,
    CertificateRecord,
    DemoConfig,
    DemoContext,
    accuracy_table,
    argument_parser,
    certify_chunk,
    chunk_size,
    config_from_args,
    markdown_table,
    plot_curves,
    read_tsv,
    stratified_order,
    summary,
    write_tsv,
)
from nodata_defense.smoothing import ABSTAIN

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argument_parser()
    parser.prog = "python benchmarks/quality.py"
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    parser.set_defaults(
        n_test=500,
        n=10_000,
        n0=100,
        steps=500,
        batch_size=250,
        full_data_per_class=None,  # all 200 real images per class of C
        out_dir=str(RESULTS / "quality"),
        work_dir=str(ROOT / "runs" / "quality-work"),
    )
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="stop after this much wall-clock time"
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard certificates made with other settings instead of refusing",
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "quality.json", help="summary JSON")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "quality.md", help="markdown report")
    parser.add_argument("--png", type=Path, default=RESULTS / "quality.png", help="certified-accuracy curves")
    parser.add_argument(
        "--readme", type=Path, default=ROOT / "README.md", help="README whose quality section to rewrite"
    )
    return parser.parse_args(argv)


def _cell_file(directory: Path, row: str, sigma: float) -> Path:
    return directory / f"certificates-{row}-sigma{sigma:g}.tsv"


def _cell_state_file(directory: Path, row: str, sigma: float) -> Path:
    return directory / f"certificates-{row}-sigma{sigma:g}.json"


def _saved_state(directory: Path, row: str, sigma: float) -> dict[str, Any] | None:
    """A cell's settings and timing, or None for a cell not yet started."""
    path = _cell_state_file(directory, row, sigma)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _saved_records(directory: Path, row: str, sigma: float) -> list[CertificateRecord]:
    """A cell's certificates so far; they must be the first images of the test order."""
    path = _cell_file(directory, row, sigma)
    records = read_tsv(path) if path.is_file() else []
    if [r.index for r in records] != stratified_order()[: len(records)].tolist():
        raise RuntimeError(
            f"{path} does not hold a prefix of the test order; remove it to start that cell again."
        )
    return records


def _settings(config: DemoConfig, context: DemoContext, row: str, sigma: float) -> dict[str, Any]:
    """What a cell's certificates depend on; certificates are appended only under the same settings."""
    fit = FIT_OF_ROW.get(row)
    return {
        "row": row,
        "sigma": sigma,
        "n0": config.n0,
        "n": config.n,
        "alpha": config.alpha,
        "batch_size": config.batch_size,
        "channels_last": config.channels_last,
        "seed": config.seed,
        "chunk": chunk_size(config),
        "classifier_sha256": context.classifier_digest,
        "denoiser_sha256": context.denoiser_digest if row != "gaussian" else None,
        "fit": context.fingerprint(sigma, fit) if fit else None,
    }


def _shown(path: Path) -> str:
    path = path.resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.as_posix()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        config = config_from_args(args)
    except ValidationError as error:
        print(f"quality.py: error: {error}", file=sys.stderr)
        return 2
    deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes
    started = time.perf_counter()
    out = Path(config.out_dir)
    context = DemoContext.create(config)
    from nodata_defense.zoo import load_digits

    test = load_digits("test")
    order = stratified_order()[: config.n_test]
    size = chunk_size(config)

    # Cells: one TSV of certificates per row and σ, its settings and timing in a JSON file beside it.
    # Each cell's two files are written only by the process that certifies that cell, so runs for
    # different σ can go on in parallel processes.
    cells: dict[tuple[str, float], list[CertificateRecord]] = {}
    state: dict[str, dict[str, Any]] = {}
    for sigma in config.sigmas:
        for row in config.rows:
            key = f"{row}@{sigma:g}"
            settings = _settings(config, context, row, sigma)
            path = _cell_file(out, row, sigma)
            state_path = _cell_state_file(out, row, sigma)
            saved = _saved_state(out, row, sigma)
            if saved is not None and saved["settings"] != settings:
                if not args.restart:
                    print(
                        f"quality.py: error: {path} was made with other settings (e.g. another model or N);"
                        " re-run with --restart to discard it, or choose another --out-dir.",
                        file=sys.stderr,
                    )
                    return 2
                saved = None
            if saved is None:
                if path.exists():
                    path.unlink()
                saved = {"settings": settings, "seconds": 0.0, "images": 0}
                atomic_write_json(state_path, saved)
            state[key] = saved
            # A smaller --n-test reads the first certificates only; the file keeps the rest.
            cells[(row, sigma)] = _saved_records(out, row, sigma)[: config.n_test]

    # Fits (or loads) once per σ that has certificates to add, and checks that each fitted cell goes
    # on with the fit that made it — before any chunk, since a cell emptied on --restart starts at 0.
    bases: dict[float, dict[str, Any]] = {}
    if deadline is None or time.monotonic() <= deadline:
        for sigma in config.sigmas:
            if all(len(cells[(row, sigma)]) >= config.n_test for row in config.rows):
                continue
            restore_fits(config, context, sigma)
            bases[sigma] = context.bases(sigma, config.rows)
            problem = check_fitted(
                config, context, sigma, bases[sigma], cells, state, test, order, args.restart
            )
            if problem:
                print(f"quality.py: error: {problem}", file=sys.stderr)
                return 2
            keep_fits(config, context, sigma)
    todo = sum(max(0, config.n_test - len(records)) for records in cells.values())
    stopped_early = False
    measured: set[tuple[str, float]] = set()  # cells this process has certified chunks of
    with tqdm(
        total=todo, desc="certify (all rows and sigmas)", unit="img", disable=not config.show_progress
    ) as bar:
        for start in range(0, config.n_test, size):
            stop = min(start + size, config.n_test)
            for sigma in config.sigmas:
                for row in config.rows:
                    records = cells[(row, sigma)]
                    if len(records) >= stop:
                        continue
                    if deadline is not None and time.monotonic() > deadline:
                        stopped_early = True
                        break
                    if len(records) < start:
                        raise RuntimeError(f"{row} at sigma={sigma:g}: chunk {start} would leave a gap")
                    index = order[start:stop]
                    # A chunk cut short by a smaller --n-test is certified again whole: its noise is
                    # drawn for the whole chunk, so this gives what a fresh run would.
                    del records[start:]
                    begin = time.perf_counter()
                    records += certify_chunk(
                        row,
                        bases[sigma][row],
                        sigma,
                        test.images[index],
                        test.labels[index],
                        index,
                        start,
                        config,
                    )
                    cell = state[f"{row}@{sigma:g}"]
                    spent = time.perf_counter() - begin
                    cell["seconds"] += spent
                    # The rate of this process alone: the estimate to finish follows the current code
                    # and machine load, not the average over every run that added to the cell.
                    latest = cell.get("latest_run") if (row, sigma) in measured else None
                    latest = latest or {"images": 0, "seconds": 0.0}
                    latest["images"] += stop - start
                    latest["seconds"] += spent
                    cell["latest_run"] = latest
                    measured.add((row, sigma))
                    cell["images"] = len(records)
                    write_tsv(records, _cell_file(out, row, sigma))
                    atomic_write_json(_cell_state_file(out, row, sigma), cell)
                    bar.update(stop - start)
                if stopped_early:
                    break
            if stopped_early:
                break

    shown, cells, state = report_cells(config, context, cells, state)
    report(shown, context, cells, state, args, stopped_early, time.perf_counter() - started)
    return 0


def _sigmas_on_disk(directory: Path) -> set[float]:
    return {
        float(json.loads(path.read_text(encoding="utf-8"))["settings"]["sigma"])
        for path in directory.glob("certificates-*-sigma*.json")
    }


def report_cells(
    config: DemoConfig,
    context: DemoContext,
    cells: dict[tuple[str, float], list[CertificateRecord]],
    state: dict[str, dict[str, Any]],
) -> tuple[DemoConfig, dict[tuple[str, float], list[CertificateRecord]], dict[str, dict[str, Any]]]:
    """What the report covers: this run's cells, and every other σ whose cells in ``--out-dir`` were
    made with the same settings (``--sigmas`` bounds the work, not the report).

    The other σ values' cells are read now, at the end, because a process running them in parallel
    may have added to them since this one started. Returns the configuration to report with (its
    ``sigmas`` extended), the cells and their state; a σ with other settings is left out, with a note.
    """
    out = Path(config.out_dir)
    cells, state = dict(cells), dict(state)
    sigmas = list(config.sigmas)
    for sigma in sorted(_sigmas_on_disk(out) - set(config.sigmas)):
        found: dict[str, tuple[dict[str, Any], list[CertificateRecord]]] = {}
        for row in config.rows:
            saved = _saved_state(out, row, sigma)
            if saved is None or saved["settings"] != _settings(config, context, row, sigma):
                break
            found[row] = saved, _saved_records(out, row, sigma)[: config.n_test]
        if len(found) < len(config.rows):
            print(
                f"quality.py: note: the certificates at sigma={sigma:g} in {_shown(out)} were not made"
                " with these settings and rows; the report leaves them out.",
                file=sys.stderr,
            )
            continue
        for row, (saved, records) in found.items():
            cells[(row, sigma)] = records
            state[f"{row}@{sigma:g}"] = saved
        sigmas.append(sigma)
    # In σ order, so the report does not depend on which process wrote it.
    sigmas.sort()
    cells = {(row, sigma): cells[(row, sigma)] for sigma in sigmas for row in config.rows}
    state = {f"{row}@{sigma:g}": state[f"{row}@{sigma:g}"] for sigma in sigmas for row in config.rows}
    return config.model_copy(update={"sigmas": tuple(sigmas)}), cells, state


def _fit_kinds(config: DemoConfig) -> list[str]:
    return sorted({FIT_OF_ROW[row] for row in config.rows if row in FIT_OF_ROW})


def kept_fit_dir(config: DemoConfig, sigma: float, kind: str) -> Path:
    """Where the fitted model at ``sigma`` on ``kind`` references is kept beside the certificates:
    its ``model/`` directory and its ``fit.json`` fingerprint, as in the work directory."""
    return Path(config.out_dir) / "fits" / f"sigma-{sigma:g}" / kind


def _replace_tree(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` so that ``target`` is always the old or the whole new tree."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp")
    retired = target.with_name(f".{target.name}.old")
    for leftover in (staging, retired):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(source, staging)
    if target.exists():
        target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)


def restore_fits(config: DemoConfig, context: DemoContext, sigma: float) -> None:
    """Put the kept fits at ``sigma`` into the work directory where it has no fitted model, so the
    demo's cache loads them (it still compares their fingerprint with the current settings, and
    fits again if they differ)."""
    for kind in _fit_kinds(config):
        kept = kept_fit_dir(config, sigma, kind)
        work = context.fitted_dir(sigma, kind)
        if (kept / "model" / "config.json").is_file() and not (work / "config.json").is_file():
            _replace_tree(kept / "model", work)
            atomic_write_bytes(work.parent / "fit.json", (kept / "fit.json").read_bytes())


def keep_fits(config: DemoConfig, context: DemoContext, sigma: float) -> None:
    """Keep a copy of each fit at ``sigma`` beside the certificates, replacing a kept copy with other
    weights (``check_fitted`` has made sure the cells go on with the work directory's fit)."""
    for kind in _fit_kinds(config):
        kept = kept_fit_dir(config, sigma, kind)
        work = context.fitted_dir(sigma, kind)
        if (kept / "model").is_dir() and fitted_digest(kept / "model") == fitted_digest(work):
            continue
        _replace_tree(work, kept / "model")
        atomic_write_bytes(kept / "fit.json", (work.parent / "fit.json").read_bytes())


def fitted_digest(model_dir: Path) -> str:
    """sha256 over the tensors of a saved ``RobustModel``'s safetensors files: each file's path, then
    each tensor's name, dtype, shape and bytes in name order. Not the files' bytes: safetensors writes
    its metadata in no fixed order, so the same weights saved twice need not be the same file."""
    digest = hashlib.sha256()
    for file in sorted(model_dir.rglob("*.safetensors")):
        digest.update(file.relative_to(model_dir).as_posix().encode() + b"\0")
        with safe_open(file, framework="pt") as tensors:
            for name in sorted(tensors.keys()):
                tensor = tensors.get_tensor(name).contiguous()
                digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_fitted(
    config: DemoConfig,
    context: DemoContext,
    sigma: float,
    bases: dict[str, Any],
    cells: dict[tuple[str, float], list[CertificateRecord]],
    state: dict[str, dict[str, Any]],
    test: Any,
    order: Any,
    restart: bool,
) -> str | None:
    """Make sure each fitted row at ``sigma`` extends its certificates with the model that made them.

    The settings fingerprint says what a fit depends on, not what it produced: a refit (say the
    work directory was lost) may not give the same weights bit for bit, and appending its
    certificates to the old ones would mix two models. So each cell records the sha256 of its
    fitted weights. A cell that has certificates but no recorded digest (made before it was
    recorded) is checked by certifying its first chunk again: every certificate must come out
    identical (same counts of 10,000 noisy samples), else the cell is refused. Returns the error,
    or None; with ``restart`` a cell that fails is emptied instead.
    """
    size = chunk_size(config)
    digests: dict[str, str] = {}  # the personalized and full-method rows share one fit
    for row in config.rows:
        kind = FIT_OF_ROW.get(row)
        if kind is None:
            continue
        model_dir = context.fitted_dir(sigma, kind)
        if kind not in digests:
            digests[kind] = fitted_digest(model_dir)
        digest = digests[kind]
        cell = state[f"{row}@{sigma:g}"]
        records = cells[(row, sigma)]
        recorded = cell.get("fitted_sha256")
        problem = None
        if records and recorded is not None and recorded != digest:
            problem = (
                f"the fit in {_shown(model_dir)} (sha256 {digest[:12]}) is not the one the"
                f" {len(records)} certificates of {row} at sigma={sigma:g} were made with"
                f" ({recorded[:12]})"
            )
        elif records and recorded is None:
            first = records[:size]
            index = order[: len(first)]
            again = certify_chunk(
                row, bases[row], sigma, test.images[index], test.labels[index], index, 0, config
            )
            if [r.tsv() for r in again] != [r.tsv() for r in first]:
                problem = (
                    f"the fit in {_shown(model_dir)} does not reproduce the first certificates of"
                    f" {row} at sigma={sigma:g}, so it is not the model that made them"
                )
        if problem is not None:
            if not restart:
                return (
                    f"{problem}; restore that fit, re-run with --restart to discard the cell,"
                    " or choose another --out-dir."
                )
            records.clear()
            cell.update(images=0, seconds=0.0)
            cell.pop("latest_run", None)
            write_tsv(records, _cell_file(Path(config.out_dir), row, sigma))
        cell["fitted_sha256"] = digest
        atomic_write_json(_cell_state_file(Path(config.out_dir), row, sigma), cell)
    return None


# Which rows are compared image by image, and at which radii (the method against its baselines).
PAIRS = (
    ("full_method", "denoiser"),
    ("personalized", "denoiser"),
    ("full_method", "personalized"),
    ("full_method", "full_data"),
)
PAIRED_RADII = (0.0, 0.5, 1.0, 1.5, 2.0)


def paired_comparison(
    cells: dict[tuple[str, float], list[CertificateRecord]], config: DemoConfig
) -> list[dict[str, Any]]:
    """Row A against row B on the same test images: at radius r, how many images only A certifies
    correctly with radius >= r, how many only B, and the exact two-sided sign test of those
    discordant images (McNemar's exact test), which is what "beats it beyond noise" means here."""
    from scipy.stats import binomtest

    out = []
    for sigma in config.sigmas:
        for a, b in PAIRS:
            if (a, sigma) not in cells or (b, sigma) not in cells:
                continue
            by_index = {r.index: r for r in cells[(b, sigma)]}
            pairs = [(r, by_index[r.index]) for r in cells[(a, sigma)] if r.index in by_index]
            if not pairs:
                continue
            for radius in PAIRED_RADII:
                hit_a = [ra.correct and ra.radius >= radius for ra, _ in pairs]
                hit_b = [rb.correct and rb.radius >= radius for _, rb in pairs]
                only_a = sum(x and not y for x, y in zip(hit_a, hit_b, strict=True))
                only_b = sum(y and not x for x, y in zip(hit_a, hit_b, strict=True))
                both = sum(x and y for x, y in zip(hit_a, hit_b, strict=True))
                p_value = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
                out.append(
                    {
                        "sigma": sigma,
                        "a": a,
                        "b": b,
                        "radius": radius,
                        "images": len(pairs),
                        "a_percent": 100 * sum(hit_a) / len(pairs),
                        "b_percent": 100 * sum(hit_b) / len(pairs),
                        "only_a": only_a,
                        "only_b": only_b,
                        "both": both,
                        "p_value": float(p_value),
                    }
                )
    return out


def paired_markdown(comparisons: list[dict[str, Any]]) -> str:
    lines = [
        "| σ | row A vs row B | r | images | A (%) | B (%) | both | only A | only B | sign-test p |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c['sigma']:g} | {ROW_TITLES[c['a']]} vs {ROW_TITLES[c['b']]} | {c['radius']:g} | {c['images']} |"
            f" {c['a_percent']:.1f} | {c['b_percent']:.1f} | {c['both']} | {c['only_a']} | {c['only_b']} |"
            f" {c['p_value']:.2g} |"
        )
    return "\n".join(lines) + "\n"


# Where a row's certificates come from: how often it predicts each class (a denoiser that turns
# most noisy digits into one class certifies that class's test images with large radii), and which
# true classes it certifies at a large radius.
CLASS_RADIUS = 1.5


def class_breakdown(
    cells: dict[tuple[str, float], list[CertificateRecord]], config: DemoConfig, num_classes: int = 10
) -> list[dict[str, Any]]:
    out = []
    for sigma in config.sigmas:
        for row in config.rows:
            group = cells.get((row, sigma), [])
            if not group:
                continue
            out.append(
                {
                    "sigma": sigma,
                    "row": row,
                    "images": len(group),
                    "predicted": [sum(r.prediction == c for r in group) for c in range(num_classes)],
                    "abstained": sum(r.prediction == ABSTAIN for r in group),
                    "radius": CLASS_RADIUS,
                    "certified_by_class": [
                        sum(r.label == c and r.correct and r.radius >= CLASS_RADIUS for r in group)
                        for c in range(num_classes)
                    ],
                    "images_by_class": [sum(r.label == c for r in group) for c in range(num_classes)],
                }
            )
    return out


def class_markdown(breakdown: list[dict[str, Any]]) -> str:
    """Two tables: predictions per class (and abstentions), then certificates at ``CLASS_RADIUS``
    per true class, each row of a table one (σ, row) cell."""
    if not breakdown:
        return ""
    classes = range(len(breakdown[0]["predicted"]))
    columns = " | ".join(str(c) for c in classes)
    rule = "|---|---|---:|" + "---:|" * len(classes)
    predicted = [f"| σ | row | images | {columns} | abstained |", rule + "---:|"]
    certified = [f"| σ | row | images | {columns} |", rule]
    for b in breakdown:
        cell = f"| {b['sigma']:g} | {ROW_TITLES[b['row']]} | {b['images']} | "
        predicted.append(cell + " | ".join(map(str, b["predicted"])) + f" | {b['abstained']} |")
        certified.append(cell + " | ".join(map(str, b["certified_by_class"])) + " |")
    test_digits = " · ".join(
        f"{c}: {n}" for c, n in zip(classes, breakdown[-1]["images_by_class"], strict=True)
    )
    return "\n".join(
        [
            "Predicted class of each test digit (the smoothed prediction; columns are classes 0–9):",
            "",
            *predicted,
            "",
            f"Test digits certified correctly with radius ≥ {CLASS_RADIUS:g}, by their true class (test digits"
            f" per class in the last cell: {test_digits}):",
            "",
            *certified,
            "",
        ]
    )


# Names of the rows inside a sentence.
_SHORT_NAMES = {
    "gaussian": "plain classifier",
    "denoiser": "off-the-shelf denoiser",
    "personalized": "self-personalized denoiser",
    "full_method": "full method",
    "full_data": "full-data reference",
}
# A difference counts as beyond noise when its exact sign test gives p below this.
NOISE_P = 0.05


def findings(
    cells: dict[tuple[str, float], list[CertificateRecord]],
    comparisons: list[dict[str, Any]],
    classes: list[dict[str, Any]],
) -> list[str]:
    """The sentences README reads the benchmark by, computed from the certificates so that they follow
    the data as the run grows, all at the largest σ unless said: the full method against the
    off-the-shelf denoiser, what each of its two steps adds, how much of the full-data reference's
    lead it gets and where it stands against that reference; every (σ, r) where it is behind the
    denoiser beyond noise, and every one where it is ahead; and how concentrated each denoising
    row's predictions are.
    ``comparisons`` and ``classes`` are :func:`paired_comparison` and :func:`class_breakdown` of
    ``cells``, which the report also writes out."""
    if not comparisons:
        return []
    by_key = {(c["sigma"], c["a"], c["b"], c["radius"]): c for c in comparisons}
    top = max(c["sigma"] for c in comparisons)

    def versus(c: dict[str, Any]) -> str:
        return (
            f"σ = {c['sigma']:g}, r = {c['radius']:g}: {_SHORT_NAMES[c['a']]} {c['a_percent']:.1f} % vs"
            f" {_SHORT_NAMES[c['b']]} {c['b_percent']:.1f} % on the same {c['images']} digits"
            f" ({c['only_a']} certified only by the {_SHORT_NAMES[c['a']]}, {c['only_b']} only by the"
            f" {_SHORT_NAMES[c['b']]}; sign-test p = {c['p_value']:.2g})."
        )

    def step(name: str, a: str, b: str) -> str | None:
        parts = [
            f"r = {c['radius']:g} {c['b_percent']:.1f} → {c['a_percent']:.1f} % ({c['only_a']} vs {c['only_b']})"
            for c in (by_key.get((top, a, b, radius)) for radius in (0.0, 1.0))
            if c is not None
        ]
        return f"σ = {top:g}, {name}: " + ", ".join(parts) + "." if parts else None

    out = [
        versus(by_key[key])
        for key in ((top, "full_method", "denoiser", r) for r in (1.0, 0.0))
        if key in by_key
    ]
    steps = (
        step(
            "personalization adds (self-personalized vs off-the-shelf denoiser)", "personalized", "denoiser"
        ),
        step(
            "classifier adaptation adds (full method vs self-personalized denoiser)",
            "full_method",
            "personalized",
        ),
    )
    out += [line for line in steps if line is not None]
    share = reference_lead_share(cells, top)
    if share is not None:
        out.append(share)
    out += [
        versus(by_key[key])
        for key in ((top, "full_method", "full_data", r) for r in (1.0, 0.0))
        if key in by_key
    ]
    against_denoiser = [c for c in comparisons if (c["a"], c["b"]) == ("full_method", "denoiser")]
    for side in ("behind", "ahead of") if against_denoiser else ():
        beyond_noise = [
            c
            for c in against_denoiser
            if c["p_value"] < NOISE_P and (c["only_b"] > c["only_a"]) == (side == "behind")
        ]
        out.append(
            f"Cells where the full method is {side} the off-the-shelf denoiser with sign-test p < {NOISE_P:g}:"
            + (
                " "
                + "; ".join(
                    f"σ = {c['sigma']:g}, r = {c['radius']:g} ({c['only_a']} vs {c['only_b']})"
                    for c in beyond_noise
                )
                if beyond_noise
                else f" none of {len(against_denoiser)} (σ, r) cells"
            )
            + "."
        )
    for b in classes:
        if b["sigma"] != top or b["row"] == "gaussian":
            continue
        common = max(range(len(b["predicted"])), key=b["predicted"].__getitem__)
        certified = sum(b["certified_by_class"])
        out.append(
            f"σ = {top:g}, {_SHORT_NAMES[b['row']]}: its most frequent prediction is {common}, for"
            f" {b['predicted'][common]} of the {b['images']} test digits ({b['images_by_class'][common]} of the"
            f" {b['images']} are {common}s);"
            f" {b['certified_by_class'][common]} of its {certified} correct certificates at r ≥ {b['radius']:g}"
            f" are {common}s."
        )
    return out


def reference_lead_share(
    cells: dict[tuple[str, float], list[CertificateRecord]],
    sigma: float,
    radii: tuple[float, ...] = (0.0, 0.5, 1.0),
) -> str | None:
    """How much of the full-data reference's lead over the off-the-shelf denoiser the full method
    gets at ``sigma``: (full − denoiser) / (reference − denoiser) in certified accuracy, on the test
    digits all three rows have certified."""
    rows = ("full_method", "denoiser", "full_data")
    if any((row, sigma) not in cells for row in rows):
        return None
    common = set.intersection(*({r.index for r in cells[(row, sigma)]} for row in rows))
    if not common:
        return None

    def accuracy(row: str, radius: float) -> float:
        hits = sum(r.correct and r.radius >= radius for r in cells[(row, sigma)] if r.index in common)
        return 100 * hits / len(common)

    parts = []
    for radius in radii:
        own = accuracy("full_method", radius) - accuracy("denoiser", radius)
        lead = accuracy("full_data", radius) - accuracy("denoiser", radius)
        parts.append(
            f"{100 * own / lead:.0f} % at r = {radius:g}"
            if lead > 0
            else f"none to share at r = {radius:g} (the reference is not ahead there)"
        )
    return (
        f"σ = {sigma:g}: the full method's lead over the off-the-shelf denoiser is "
        + ", ".join(parts)
        + f" of the full-data reference's lead (on the {len(common)} digits all three rows certified)."
    )


def _settings_arguments() -> list[str]:
    """This run's command-line arguments without those that only pace or quiet it, so the command
    quoted in the report is the one that reproduces (and continues) the results."""
    argv = sys.argv[1:] if sys.argv[0].endswith("quality.py") else []
    return reproducing_arguments(argv, valued=("--max-minutes", "--threads"), flags=("--quiet", "--restart"))


def report(
    config: DemoConfig,
    context: DemoContext,
    cells: dict[tuple[str, float], list[CertificateRecord]],
    state: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    stopped_early: bool,
    session_seconds: float,
) -> None:
    records = [r for group in cells.values() for r in group]
    command = "python benchmarks/quality.py" + "".join(f" {shlex.quote(a)}" for a in _settings_arguments())
    throughput = {}
    remaining = 0.0
    for (row, sigma), group in cells.items():
        cell = state[f"{row}@{sigma:g}"]
        per_image = cell["seconds"] / cell["images"] if cell["images"] else None
        latest = cell.get("latest_run") or {"images": 0}
        latest_per_image = latest["seconds"] / latest["images"] if latest["images"] else per_image
        throughput[f"{row}@{sigma:g}"] = {
            "images": cell["images"],
            "seconds": round(cell["seconds"], 1),
            "seconds_per_image": None if per_image is None else round(per_image, 2),
            "seconds_per_image_latest_run": None if latest_per_image is None else round(latest_per_image, 2),
            "samples_per_second": None if per_image is None else round((config.n0 + config.n) / per_image, 1),
        }
        if latest_per_image is not None:
            remaining += latest_per_image * (config.n_test - len(group))
    unmeasured = [key for key, t in throughput.items() if t["images"] == 0]
    comparisons = paired_comparison(cells, config)
    classes = class_breakdown(cells, config)
    key_findings = findings(cells, comparisons, classes)
    findings_markdown = "".join(f"- {line}\n" for line in key_findings)
    complete = all(len(group) >= config.n_test for group in cells.values())
    accuracy, counts = accuracy_table(records, config) if records else ({}, {})
    seconds = {**context.seconds, "this session": session_seconds}
    extra = {
        "command": command,
        "complete": complete,
        "stopped_early": stopped_early,
        "cells": throughput,
        "estimated_seconds_to_finish": None if unmeasured else round(remaining),
        "cells_without_timing": unmeasured,
        "paired_comparisons": comparisons,
        "classes": classes,
        "findings": key_findings,
        "machine": {"torch_threads": torch.get_num_threads(), "platform": sys.platform},
    }
    atomic_write_json(args.json, summary(accuracy, counts, records, config, seconds, **extra))
    if records:
        plot_curves(
            accuracy,
            config.radii,
            config.sigmas,
            config.rows,
            args.png,
            title=f"digits, N0={config.n0}, N={config.n}, α={config.alpha:g} (images per cell: see quality.json)",
        )
    lowest = min((len(g) for g in cells.values()), default=0)
    status = (
        f"complete: {config.n_test} test images per cell"
        if complete
        else f"partial: {lowest} to {max(len(g) for g in cells.values())} of {config.n_test} test images per cell"
    )
    eta = extra["estimated_seconds_to_finish"]
    lines = [
        "# Quality benchmark: certified accuracy on real digits",
        "",
        "The five rows of the digits demo (docs/demo.md) at the paper's certification settings: N = "
        f"{config.n:,}, N0 = {config.n0}, α = {config.alpha:g}, the first {config.n_test} test digits of a fixed"
        " stratified order of the split T. Certified accuracy (%) at ℓ2 radius r: the fraction of test images"
        " certified with the correct label and a radius ≥ r (r = 0: correct and not abstained).",
        "",
        f"Status: **{status}**.",
        "",
        markdown_table(accuracy, config.radii, config.sigmas, config.rows, counts),
        "Key comparisons (computed from the tables below):",
        "",
        findings_markdown,
        "Rows: " + "; ".join(f"*{ROW_TITLES[r]}*" for r in config.rows) + ". Fits: "
        f"{config.shots_per_class} synthetic references per class ({config.synthesis_steps} DDIM steps),"
        f" {config.personalize_steps} personalization steps (batch {config.personalize_batch_size}, lr"
        f" {config.personalize_lr:g}, LoRA rank {config.lora_rank}, λ = {config.classifier_weight:g}),"
        f" classifier adaptation {config.adapt_mode} for {config.adapt_epochs} epochs at lr {config.adapt_lr:g};"
        " the full-data row uses "
        + (f"{config.full_data_per_class}" if config.full_data_per_class else "all 200")
        + " real images per class of the split C.",
        "",
        "Paired comparisons on the same test images (certified correctly with radius ≥ r by row A only"
        " or by row B only; the p-value is the exact two-sided sign test of those discordant images):",
        "",
        paired_markdown(comparisons),
        class_markdown(classes),
        "Measured cost per test image (seconds, this machine; over all sessions / in the latest run): "
        + ", ".join(
            f"{key} {t['seconds_per_image']} / {t['seconds_per_image_latest_run']}"
            for key, t in throughput.items()
            if t["seconds_per_image"] is not None
        )
        + ".",
        "",
        (
            f"Estimated time to finish at the measured rates: {eta / 3600:.1f} h of one process (the sum over"
            " cells of seconds per image in the latest run that certified the cell × images left; processes for different σ share it out, but each"
            " one runs slower while they share the cores)."
            if eta is not None and not complete
            else ""
        ),
        "",
        "Reproduce (re-run the same command to continue; `--max-minutes M` stops cleanly):",
        "",
        "```",
        command,
        "```",
        "",
        f"Results: `{_shown(args.json)}`, curves `{_shown(args.png)}`, per-image"
        f" certificates `{_shown(Path(config.out_dir))}/certificates-<row>-sigma<σ>.tsv`, the fitted models"
        f" they were made with `{_shown(Path(config.out_dir))}/fits/` (a re-run starts from these, not from"
        " a new fit).",
        "",
    ]
    atomic_write_text(args.markdown, "\n".join(lines).replace("\n\n\n", "\n\n"))
    if args.readme is not None:
        write_section(
            args.readme,
            "quality",
            "\n".join(
                [
                    f"Quality benchmark (`{command}`; {status}): certified accuracy (%) at ℓ2 radius r, N ="
                    f" {config.n:,}, N0 = {config.n0}, α = {config.alpha:g}, first test digits of a fixed"
                    " stratified order; the last column is the number of test digits behind each row.",
                    "",
                    markdown_table(accuracy, config.radii, config.sigmas, config.rows, counts),
                    *(
                        ["Key comparisons on the same test digits:", "", findings_markdown]
                        if key_findings
                        else []
                    ),
                    f"Details, cost and how to continue the run: [{_shown(args.markdown)}]({_shown(args.markdown)}).",
                ]
            ),
        )
    print(markdown_table(accuracy, config.radii, config.sigmas, config.rows, counts))
    print(status + (f"; estimated {eta / 3600:.1f} h to finish" if eta is not None and not complete else ""))


if __name__ == "__main__":
    sys.exit(main())
