"""The digits demo: a smoke run at tiny sizes through the CLI, its outputs, and its pure helpers."""

from __future__ import annotations

import json

import pytest
import torch
from robust_fixtures import TINY_DEMO_OPTIONS

from nodata_defense import cli
from nodata_defense.demo import (
    ROWS,
    TSV_COLUMNS,
    CertificateRecord,
    DemoConfig,
    SplitImages,
    certified_accuracy,
    chunk_seed,
    format_table,
    markdown_table,
    read_tsv,
    run_demo,
    stratified_order,
)
from nodata_defense.zoo import DIGIT_CLASS_NAMES, load_digits

RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
TINY = ["--sigmas", "0.5", "--n-test", "10", *TINY_DEMO_OPTIONS]


def test_demo_end_to_end_through_the_cli(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", *TINY, "--out-dir", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "sigma = 0.5" in printed and "full method" in printed and "wall-clock" in printed
    # --quiet: no library's loading chatter (huggingface_hub's print, transformers' weight bar).
    assert "Loading weights" not in printed + captured.err

    records = read_tsv(out / "certificates.tsv")
    assert (out / "certificates.tsv").read_text().splitlines()[0].split("\t") == list(TSV_COLUMNS)
    assert len(records) == len(ROWS) * 10
    assert {r.row for r in records} == set(ROWS)
    test = load_digits("test")
    for r in records:
        assert r.sigma == 0.5
        assert r.label == int(test.labels[r.index])  # the TSV's index points into the test split
        assert r.prediction == -1 or 0 <= r.prediction < 10
        assert r.radius >= 0 and (r.prediction != -1 or r.radius == 0)
        assert 0.0 <= r.pa_lower <= 1.0 and 0 <= r.count <= 20
    # Every row certified the same images.
    assert len({tuple(r.index for r in records if r.row == row) for row in ROWS}) == 1

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["rows"]) == set(ROWS)
    for row in ROWS:
        cell = summary["rows"][row]["sigmas"]["0.5"]
        accuracy = cell["certified_accuracy"]
        assert cell["radii"] == list(RADII) and cell["images"] == 10
        assert all(0.0 <= a <= 1.0 for a in accuracy)
        assert all(a >= b for a, b in zip(accuracy, accuracy[1:], strict=False))
        assert accuracy == list(certified_accuracy([r for r in records if r.row == row], RADII))
    assert summary["settings"]["n"] == 20 and summary["settings"]["n0"] == 10
    assert {"torch", "diffusers", "peft", "nodata-defense"} <= set(summary["versions"])
    assert any(k.startswith("fit synthetic") for k in summary["seconds"])
    assert any(k.startswith("fit full_data") for k in summary["seconds"])
    assert len(summary["test_split"]["indices"]) == 10
    assert (out / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A re-run with the same fit settings loads the fitted model from work_dir instead of fitting,
    # and its certificates (same seeds) are the same.
    again = run_demo(
        DemoConfig(
            sigmas=(0.5,),
            rows=("full_method",),
            n_test=10,
            n0=10,
            n=20,
            shots_per_class=1,
            synthesis_steps=2,
            personalize_steps=2,
            personalize_batch_size=4,
            adapt_epochs=1,
            full_data_per_class=1,
            out_dir=str(tmp_path / "again"),
            work_dir=str(out / "work"),
            show_progress=False,
        )
    )
    assert "load fitted synthetic sigma=0.5" in again.seconds
    assert not any(k.startswith("fit ") for k in again.seconds)
    first = [r for r in records if r.row == "full_method"]
    assert [(r.index, r.prediction, r.count) for r in again.records] == [
        (r.index, r.prediction, r.count) for r in first
    ]
    assert [r.radius for r in again.records] == pytest.approx([r.radius for r in first], abs=1e-6)


def test_certified_accuracy_counts_correct_certificates_with_radius_at_least_r():
    def record(label, prediction, radius):
        return CertificateRecord("full_method", 0.5, 0, label, prediction, radius, 0.9, 10)

    records = [record(1, 1, 0.3), record(2, 2, 0.6), record(3, 4, 1.0), record(5, -1, 0.0)]
    assert certified_accuracy(records, (0.0, 0.3, 0.5, 0.6, 0.7)) == (0.5, 0.5, 0.25, 0.25, 0.0)
    with pytest.raises(ValueError, match="`records` is empty"):
        certified_accuracy([], RADII)
    assert CertificateRecord.from_tsv(records[1].tsv()) == records[1]


def test_test_order_is_stratified_fixed_and_disjoint():
    order = stratified_order()
    labels = load_digits("test").labels
    assert len(order) == len(set(order.tolist())) == len(labels)
    assert sorted(labels[order[:10]].tolist()) == list(range(10))
    assert torch.bincount(labels[order[:100]], minlength=10).tolist() == [10] * 10
    assert order.tolist() == stratified_order().tolist()


def test_split_images_serve_the_real_images_by_seed():
    from nodata_defense.config import SynthesisConfig
    from nodata_defense.synthesis import synthesize

    split = load_digits("classifier")
    source = SplitImages(split.images, split.labels, DIGIT_CLASS_NAMES, seed=3, name="classifier")
    refs = synthesize(DIGIT_CLASS_NAMES, source, SynthesisConfig(shots_per_class=2, seed=3))
    for i in range(len(refs)):
        label, shot = int(refs.labels[i]), i % 2
        expected = split.images[torch.nonzero(split.labels == label).flatten()[shot]]
        assert torch.equal(refs.images[i], expected)  # 8-bit digits survive the quantization exactly
    with pytest.raises(ValueError, match=r"no image for \d+ requested"):
        synthesize(DIGIT_CLASS_NAMES, source, SynthesisConfig(shots_per_class=201, seed=3))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="`sigmas` must be distinct positive"):
        DemoConfig(sigmas=(0.5, 0.5))
    with pytest.raises(ValueError, match="`radii` must be increasing"):
        DemoConfig(radii=(0.5, 0.25))
    with pytest.raises(ValueError, match="too small to certify anything"):
        DemoConfig(n=5)
    with pytest.raises(ValueError, match="rows"):
        DemoConfig(rows=("gaussian", "unknown"))
    assert DemoConfig(rows=("full_data", "gaussian")).rows == ("gaussian", "full_data")
    with pytest.raises(ValueError, match="'synthetic' or 'full_data'"):
        DemoConfig().robustifier_config(0.5, "other")
    fit = DemoConfig(full_data_per_class=7).robustifier_config(0.5, "full_data")
    assert fit.synthesis.shots_per_class == 7 and fit.sigma == 0.5 and fit.denoiser_prompt == ""


def test_tables_and_noise_seeds():
    accuracy = {"gaussian": {0.5: (0.5, 0.25)}, "full_method": {0.5: (0.75, 0.5)}}
    text = format_table(accuracy, (0.0, 0.5), (0.5,), ("gaussian", "full_method"))
    assert "sigma = 0.5" in text and "75.0" in text and "25.0" in text
    md = markdown_table(accuracy, (0.0, 0.5), (0.5, 1.0), ("gaussian", "full_method"), {("gaussian", 0.5): 4})
    assert "| 0.5 | Gaussian smoothing, plain classifier | 50.0 | 25.0 | 4 |" in md
    assert "| 1 | + classifier adaptation (full method) | – | – | 0 |" in md
    assert chunk_seed(0, 0.5, 0) == chunk_seed(0, 0.5, 0) != chunk_seed(0, 0.5, 10)


@pytest.mark.parametrize("channels_last", [True, False])
def test_certified_models_take_the_configured_memory_format(tmp_path, channels_last):
    from nodata_defense.demo import DemoContext

    config = DemoConfig(out_dir=str(tmp_path), channels_last=channels_last, show_progress=False)
    context = DemoContext.create(config)
    bases = context.bases(0.5, ("gaussian", "denoiser"))
    # The classifier later fits start from keeps its format whatever the certified copies take.
    assert not context.classifier.features[3].weight.is_contiguous(memory_format=torch.channels_last)
    for base in bases.values():
        convolutions = [m.weight for m in base.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convolutions
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions) is channels_last


def test_demo_denoises_once_for_the_personalized_and_full_method_rows(tmp_path, monkeypatch):
    from nodata_defense import demo
    from nodata_defense.denoiser import DiffusionDenoiser

    calls = []
    forward = DiffusionDenoiser.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    # Several chunks, each of several noise batches: 5 images x (10 + 20) samples, 2 images per chunk.
    monkeypatch.setattr(demo, "_SAMPLES_PER_CHUNK", 60)
    options = [*TINY, "--n-test", "5", "--batch-size", "8", "--rows", "personalized", "full_method"]
    options += ["--work-dir", str(tmp_path / "work")]
    assert cli.main(["demo", *options, "--out-dir", str(tmp_path / "warm")]) == 0  # fits
    monkeypatch.setattr(DiffusionDenoiser, "forward", counted)
    assert cli.main(["demo", *options, "--out-dir", str(tmp_path / "shared")]) == 0
    shared = len(calls)
    monkeypatch.setattr(demo, "share_denoising", lambda bases, capacity: bases)
    calls.clear()
    assert cli.main(["demo", *options, "--out-dir", str(tmp_path / "unshared")]) == 0

    tsv = [(tmp_path / name / "certificates.tsv").read_text() for name in ("shared", "unshared")]
    assert tsv[0] == tsv[1] and len(tsv[0].splitlines()) == 1 + 2 * 5
    # 3 chunks (2 + 2 + 1 images), each ceil(k·10 / 8) + ceil(k·20 / 8) batches: 3 + 5, 3 + 5, 2 + 3.
    assert shared == 21 and len(calls) == 2 * shared


def test_fit_fingerprint_names_the_denoiser_by_its_weights_not_its_location(tmp_path):
    import shutil

    from nodata_defense.demo import DemoContext
    from nodata_defense.zoo import digit_denoiser_path

    copies = [tmp_path / name / "digits-denoiser" for name in ("here", "elsewhere")]
    for copy in copies:
        shutil.copytree(digit_denoiser_path(), copy)
    fingerprints = [
        DemoContext.create(
            DemoConfig(out_dir=str(tmp_path), denoiser=str(c), show_progress=False)
        ).fingerprint(0.5, "synthetic")
        for c in copies
    ]
    assert fingerprints[0] == fingerprints[1]
    assert str(tmp_path) not in json.dumps(fingerprints[0])
    # Another model (here, one setting of its UNet changed) is another fit.
    weights = copies[1] / "unet" / "config.json"
    weights.write_text(weights.read_text().replace('"norm_eps": 1e-05', '"norm_eps": 1e-06'))
    changed = DemoContext.create(
        DemoConfig(out_dir=str(tmp_path), denoiser=str(copies[1]), show_progress=False)
    )
    assert changed.fingerprint(0.5, "synthetic")["denoiser_sha256"] != fingerprints[0]["denoiser_sha256"]
