"""benchmarks/style_shift.py's comparison with the in-domain demo: only under the same settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from robust_fixtures import benchmark_module

from nodata_defense.demo import DemoConfig


@pytest.fixture(scope="module")
def style_shift():
    with benchmark_module("style_shift") as module:
        yield module


def test_in_domain_run_differs_from_the_printed_run_only_in_its_models_and_where_it_writes(style_shift):
    printed = DemoConfig(
        sigmas=(1.0,), rows=("denoiser", "full_method"), generator="g", denoiser="d", out_dir="o", n=640
    )
    in_domain = style_shift.in_domain_config(printed)
    assert (in_domain.generator, in_domain.denoiser) == (None, None)  # the bundled models
    assert Path(in_domain.out_dir) == Path("o/in-domain")
    assert Path(in_domain.work_path) == Path("o/work/in-domain")
    placement = {"generator", "denoiser", "out_dir", "work_dir"}
    assert in_domain.model_dump(exclude=placement) == printed.model_dump(exclude=placement)


def test_the_published_run_is_what_the_script_configures_today(style_shift):
    """--report-only re-renders the committed run only while the script still asks for its settings
    (a change of the demo's defaults must not reach it)."""
    summary = Path(style_shift.ROOT) / "benchmarks" / "results" / "style_shift" / "summary.json"
    published = json.loads(summary.read_text(encoding="utf-8"))["settings"]
    today = DemoConfig(**style_shift.SIZES).model_dump(mode="json")
    placement = {"generator", "denoiser", "out_dir", "work_dir", "show_progress", "rows"}
    differ = sorted(k for k in today if k not in placement and published[k] != today[k])
    assert differ == []


def test_report_puts_both_generators_side_by_side(style_shift, tmp_path):
    settings = DemoConfig(sigmas=(1.0,), rows=("denoiser", "full_method"), radii=(0.0, 1.0)).model_dump(
        mode="json"
    )
    result = {
        "measured_at_utc": "2026-12-02 01:00",
        "machine": {"cpu": "cpu", "torch": "2.13.0", "torch_threads": 2},
        "command": "python benchmarks/style_shift.py",
        "seconds": 600.0,
        "settings": settings,
        "printed": {"denoiser": {"1": [0.2, 0.1]}, "full_method": {"1": [0.6, 0.3]}},
        "in_domain": {"denoiser": {"1": [0.5, 0.25]}, "full_method": {"1": [0.75, 0.5]}},
        "generator_evaluation": {"handwritten": {}, "printed": {}},
        "paired_comparisons": [],
        "classifier_on_printed": {"printed_images": 1000, "printed_accuracy": 0.875, "test_accuracy": 0.985},
    }
    text = style_shift.render(result)
    assert "| 1 | + off-the-shelf denoiser | handwritten | 50 | 25 |" in text
    assert "| 1 | + off-the-shelf denoiser | printed | 20 | 10 |" in text
    assert "| 1 | + classifier adaptation (full method) | printed | 60 | 30 |" in text
    assert "(10 minutes here" in text
    assert "reads 87.5 % of 1,000 printed digits correctly" in text and "98.5 % of the handwritten" in text


def test_report_only_rereads_the_last_run_only_under_the_same_settings(style_shift, tmp_path, capsys):
    from nodata_defense.demo import TSV_COLUMNS, CertificateRecord

    out = tmp_path / "out"
    out.mkdir()
    args = style_shift.parse_args(["--out-dir", str(out), "--json", str(tmp_path / "style_shift.json")])
    settings = DemoConfig(sigmas=(1.0,), out_dir=str(out)).model_dump(mode="json")
    assert style_shift._previous_run(args, settings) is None
    assert "no earlier run in" in capsys.readouterr().err

    record = CertificateRecord("denoiser", 1.0, 3, 8, 8, 1.25, 0.9, 300)
    (out / "certificates.tsv").write_text("\t".join(TSV_COLUMNS) + "\n" + record.tsv() + "\n")
    (out / "summary.json").write_text(json.dumps({"settings": {**settings, "n": 640}}))
    measured = {"seconds": 60.0, "measured_at_utc": "then", "machine": {"cpu": "x"}, "in_domain": {}}
    (tmp_path / "style_shift.json").write_text(json.dumps({**measured, "printed": {}}))
    assert style_shift._previous_run(args, settings) is None
    assert "was made with other settings (n)" in capsys.readouterr().err

    (out / "summary.json").write_text(json.dumps({"settings": {**settings, "show_progress": False}}))
    assert style_shift._previous_run(args, settings) == ([record], measured)
