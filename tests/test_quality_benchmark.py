"""benchmarks/quality.py at tiny sizes: per-cell files, resuming, refusing other settings, and σ
values run by separate processes (here: separate calls) meeting in one report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from robust_fixtures import TINY_DEMO_OPTIONS, benchmark_module

ROWS = ("gaussian", "denoiser", "personalized", "full_method", "full_data")


@pytest.fixture(scope="module")
def quality():
    with benchmark_module("quality") as module:
        yield module


def _run(quality, tmp_path: Path, *args: str) -> int:
    readme = tmp_path / "README.md"
    if not readme.exists():
        readme.write_text("# x\n\n<!-- quality:start -->\nold\n<!-- quality:end -->\n\nkept\n")
    return quality.main(
        [
            *TINY_DEMO_OPTIONS,
            *args,
            "--out-dir",
            str(tmp_path / "results"),
            "--work-dir",
            str(tmp_path / "work"),
            "--json",
            str(tmp_path / "quality.json"),
            "--markdown",
            str(tmp_path / "quality.md"),
            "--png",
            str(tmp_path / "quality.png"),
            "--readme",
            str(readme),
        ]
    )


def _cell(tmp_path: Path, row: str, sigma: str) -> tuple[list[str], dict]:
    base = tmp_path / "results" / f"certificates-{row}-sigma{sigma}"
    lines = Path(f"{base}.tsv").read_text().splitlines()
    return lines, json.loads(Path(f"{base}.json").read_text())


def test_cells_resume_refuse_other_settings_and_meet_across_sigma_runs(quality, tmp_path, capsys):
    assert _run(quality, tmp_path, "--sigmas", "0.5", "--n-test", "2") == 0
    first = {}
    for row in ROWS:
        lines, state = _cell(tmp_path, row, "0.5")
        assert len(lines) == 1 + 2  # header + one certificate per test image
        assert state["images"] == 2 and state["seconds"] > 0
        assert state["settings"]["row"] == row and state["settings"]["n"] == 20
        first[row] = lines

    # More test images: the cells continue, and hold what a fresh run with that many would (the
    # tiny settings put every image in one chunk, so the cut-short chunk is certified again whole).
    assert _run(quality, tmp_path, "--sigmas", "0.5", "--n-test", "3") == 0
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "work").symlink_to(tmp_path / "work")  # the same fitted models
    assert _run(quality, fresh, "--sigmas", "0.5", "--n-test", "3") == 0
    for row in ROWS:
        lines, state = _cell(tmp_path, row, "0.5")
        assert len(lines) == 1 + 3 and state["images"] == 3
        # The latest run's rate counts only its own work: the whole (one-chunk) 3 images again.
        assert state["latest_run"]["images"] == 3 and 0 < state["latest_run"]["seconds"] < state["seconds"]
        assert lines == _cell(fresh, row, "0.5")[0]
        first[row] = lines

    # A smaller --n-test reports on the first images and leaves the files as they are.
    assert _run(quality, tmp_path, "--sigmas", "0.5", "--n-test", "2", "--max-minutes", "0") == 0
    summary = json.loads((tmp_path / "quality.json").read_text())
    assert summary["complete"] is True and {c["images"] for c in summary["paired_comparisons"]} == {2}
    assert all(_cell(tmp_path, row, "0.5")[0] == first[row] for row in ROWS)

    # Another σ, as a separate process would run it, leaves the σ = 0.5 cells untouched, and its
    # report covers both σ values (with the σ = 0.5 cells as they are on disk, 3 images each).
    assert _run(quality, tmp_path, "--sigmas", "0.25", "--n-test", "3") == 0
    for row in ROWS:
        assert _cell(tmp_path, row, "0.5")[0] == first[row]
        assert len(_cell(tmp_path, row, "0.25")[0]) == 1 + 3
    summary = json.loads((tmp_path / "quality.json").read_text())
    assert set(summary["cells"]) == {f"{row}@{s}" for s in ("0.25", "0.5") for row in ROWS}
    assert all(cell["images"] == 3 for cell in summary["cells"].values())

    # A run that certifies nothing reports every σ, and rewrites only README's quality section.
    capsys.readouterr()
    assert _run(quality, tmp_path, "--sigmas", "0.25", "0.5", "--n-test", "3", "--max-minutes", "0") == 0
    summary = json.loads((tmp_path / "quality.json").read_text())
    assert summary["complete"] is True
    assert set(summary["cells"]) == {f"{row}@{s}" for row in ROWS for s in ("0.25", "0.5")}
    assert all(cell["images"] == 3 for cell in summary["cells"].values())
    assert {c["sigma"] for c in summary["paired_comparisons"]} == {0.25, 0.5}
    assert len(summary["classes"]) == 2 * len(ROWS)
    assert any(line.startswith("Cells where the full method is behind") for line in summary["findings"])
    for cell in summary["classes"]:
        assert (
            sum(cell["predicted"]) + cell["abstained"] == cell["images"] == sum(cell["images_by_class"]) == 3
        )
        assert all(
            0 <= c <= n for c, n in zip(cell["certified_by_class"], cell["images_by_class"], strict=True)
        )
    readme = (tmp_path / "README.md").read_text()
    assert "old" not in readme and readme.endswith("\n\nkept\n") and "complete: 3 test images" in readme
    assert "| 0.25 |" in (tmp_path / "quality.md").read_text()

    # Certificates that are not the first images of the test order are refused, whether the run
    # certifies that σ or only reports it; the file is named and left as it is.
    tsv = tmp_path / "results" / "certificates-gaussian-sigma0.25.tsv"
    good = tsv.read_text()
    header, first_line, *rest = good.splitlines(keepends=True)
    tsv.write_text(header + "".join(rest) + first_line)
    for sigma in ("0.25", "0.5"):
        with pytest.raises(
            RuntimeError, match=r"certificates-gaussian-sigma0\.25\.tsv does not hold a prefix"
        ):
            _run(quality, tmp_path, "--sigmas", sigma, "--n-test", "3", "--max-minutes", "0")
    assert tsv.read_text() != good
    tsv.write_text(good)

    # Other settings for an existing cell: refused with the file named, or discarded on --restart.
    assert _run(quality, tmp_path, "--sigmas", "0.5", "--n-test", "3", "--n", "30") == 2
    assert "was made with other settings" in capsys.readouterr().err
    assert _cell(tmp_path, "gaussian", "0.5")[0] == first["gaussian"]
    assert _run(quality, tmp_path, "--sigmas", "0.5", "--n-test", "1", "--n", "30", "--restart") == 0
    lines, state = _cell(tmp_path, "gaussian", "0.5")
    assert len(lines) == 1 + 1 and state["settings"]["n"] == 30 and state["images"] == 1
    # The σ = 0.25 cells were made with N = 20: left out of this N = 30 report, and said so.
    err = capsys.readouterr().err
    assert "certificates at sigma=0.25" in err and "the report leaves them out" in err
    summary = json.loads((tmp_path / "quality.json").read_text())
    assert set(summary["cells"]) == {f"{row}@0.5" for row in ROWS}


def _findings(quality, cells, config):
    return quality.findings(
        cells, quality.paired_comparison(cells, config), quality.class_breakdown(cells, config)
    )


def test_findings_follow_the_paired_counts_and_class_tables(quality):
    from types import SimpleNamespace

    from nodata_defense.demo import CertificateRecord

    def cell(row, sigma, prediction_radius):
        return [CertificateRecord(row, sigma, i, i, *prediction_radius(i), 0.9, 10) for i in range(10)]

    cells = {
        # σ = 1: the denoiser turns every digit into an 8 (correct, with a large radius, only for the
        # real 8); the full method certifies every digit with radius 1.
        ("denoiser", 1.0): cell("denoiser", 1.0, lambda i: (8, 2.0 if i == 8 else 0.3)),
        ("full_method", 1.0): cell("full_method", 1.0, lambda i: (i, 1.0)),
        # σ = 0.5: the full method abstains everywhere, the denoiser certifies every digit at 0.6.
        ("denoiser", 0.5): cell("denoiser", 0.5, lambda i: (i, 0.6)),
        ("full_method", 0.5): cell("full_method", 0.5, lambda i: (-1, 0.0)),
    }
    config = SimpleNamespace(sigmas=(0.5, 1.0), rows=("denoiser", "full_method"))
    lines = _findings(quality, cells, config)

    assert lines[0] == (
        "σ = 1, r = 1: full method 100.0 % vs off-the-shelf denoiser 10.0 % on the same 10 digits"
        " (9 certified only by the full method, 0 only by the off-the-shelf denoiser; sign-test p = 0.0039)."
    )
    assert lines[1].startswith("σ = 1, r = 0: full method 100.0 % vs off-the-shelf denoiser 10.0 %")
    # No full-data row: no sentence about it. Behind beyond noise: σ = 0.5 at r = 0 and 0.5 (0 vs 10,
    # p = 0.002), not σ = 1 at r = 1.5 and 2 (0 vs 1, p = 1).
    assert not any("full-data" in line for line in lines)
    assert lines[2] == (
        "Cells where the full method is behind the off-the-shelf denoiser with sign-test p < 0.05:"
        " σ = 0.5, r = 0 (0 vs 10); σ = 0.5, r = 0.5 (0 vs 10)."
    )
    # Ahead beyond noise: σ = 1 wherever the full method's radius 1 counts (9 vs 0, p = 0.0039).
    assert lines[3] == (
        "Cells where the full method is ahead of the off-the-shelf denoiser with sign-test p < 0.05:"
        " σ = 1, r = 0 (9 vs 0); σ = 1, r = 0.5 (9 vs 0); σ = 1, r = 1 (9 vs 0)."
    )
    assert lines[4] == (
        "σ = 1, off-the-shelf denoiser: its most frequent prediction is 8, for 10 of the 10 test digits"
        " (1 of the 10 are 8s); 1 of its 1 correct certificates at r ≥ 1.5 are 8s."
    )
    assert lines[5].startswith("σ = 1, full method: its most frequent prediction is 0, for 1 of the 10")
    assert lines[5].endswith("0 of its 0 correct certificates at r ≥ 1.5 are 0s.")
    assert len(lines) == 6
    assert _findings(quality, {}, config) == []


def test_findings_say_what_each_step_adds_and_the_share_of_the_reference_lead(quality):
    from types import SimpleNamespace

    from nodata_defense.demo import CertificateRecord

    def cell(row, prediction_radius):
        return [CertificateRecord(row, 1.0, i, i, *prediction_radius(i), 0.9, 10) for i in range(10)]

    cells = {
        ("denoiser", 1.0): cell("denoiser", lambda i: (8, 2.0 if i == 8 else 0.3)),  # 10 % at r ≤ 2
        ("personalized", 1.0): cell("personalized", lambda i: (i, 1.0) if i < 5 else (-1, 0.0)),  # 50 %
        ("full_method", 1.0): cell("full_method", lambda i: (i, 1.0)),  # 100 % at r ≤ 1
        # The reference: 100 % at r ≤ 0.5, nothing at r = 1 (below the denoiser's 10 %); its first
        # digit is missing, so the share is computed on the other 9.
        ("full_data", 1.0): cell("full_data", lambda i: (i, 0.6))[1:],
    }
    config = SimpleNamespace(sigmas=(1.0,), rows=("denoiser", "personalized", "full_method", "full_data"))
    lines = _findings(quality, cells, config)

    assert lines[2] == (
        "σ = 1, personalization adds (self-personalized vs off-the-shelf denoiser):"
        " r = 0 10.0 → 50.0 % (5 vs 1), r = 1 10.0 → 50.0 % (5 vs 1)."
    )
    assert lines[3] == (
        "σ = 1, classifier adaptation adds (full method vs self-personalized denoiser):"
        " r = 0 50.0 → 100.0 % (5 vs 0), r = 1 50.0 → 100.0 % (5 vs 0)."
    )
    # On the 9 common digits the denoiser certifies 1 (11.1 %), the method and the reference 9 at
    # r ≤ 0.5: the method gets all of the reference's lead there.
    assert lines[4] == (
        "σ = 1: the full method's lead over the off-the-shelf denoiser is 100 % at r = 0, 100 % at"
        " r = 0.5, none to share at r = 1 (the reference is not ahead there) of the full-data"
        " reference's lead (on the 9 digits all three rows certified)."
    )
    assert lines[5].startswith("σ = 1, r = 1: full method 100.0 % vs full-data reference 0.0 % on the same 9")
    assert quality.reference_lead_share(cells, 0.5) is None


def test_shared_denoising_gives_the_unshared_certificates_with_fewer_denoiser_calls(
    quality, tmp_path, monkeypatch
):
    from nodata_defense import demo
    from nodata_defense.denoiser import DiffusionDenoiser

    calls = []
    forward = DiffusionDenoiser.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionDenoiser, "forward", counted)
    options = ("--sigmas", "0.5", "--n-test", "2", "--rows", "personalized", "full_method")
    warm, shared, unshared = tmp_path / "warm", tmp_path / "shared", tmp_path / "unshared"
    warm.mkdir()
    assert _run(quality, warm, *options) == 0  # fits the models
    for directory in (shared, unshared):
        directory.mkdir()
        (directory / "work").symlink_to(warm / "work")  # the same fitted models: the runs only certify
    calls.clear()
    assert _run(quality, shared, *options) == 0
    shared_calls = len(calls)
    monkeypatch.setattr(demo, "share_denoising", lambda bases, capacity: bases)
    calls.clear()
    assert _run(quality, unshared, *options) == 0

    for row in ("personalized", "full_method"):
        assert _cell(shared, row, "0.5")[0] == _cell(unshared, row, "0.5")[0]
    # Unshared, each row calls the denoiser once per noise batch; shared, the second row calls it never.
    assert shared_calls > 0 and 2 * shared_calls == len(calls)


def test_a_cell_continues_only_with_the_fit_that_made_its_certificates(
    quality, tmp_path, capsys, monkeypatch
):
    from safetensors.torch import load_file, save_file

    from nodata_defense.demo import read_tsv, stratified_order

    # One image per chunk, as at the benchmark's own settings, so a cell can fall behind the others.
    monkeypatch.setattr(quality, "chunk_size", lambda config: 1)

    options = ("--sigmas", "0.5", "--rows", "personalized", "full_data")
    assert _run(quality, tmp_path, *options, "--n-test", "1") == 0
    for row in ("personalized", "full_data"):
        assert len(_cell(tmp_path, row, "0.5")[1]["fitted_sha256"]) == 64

    # A cell from before digests were recorded: its first chunk is certified again and must match.
    state_file = tmp_path / "results" / "certificates-personalized-sigma0.5.json"
    state = json.loads(state_file.read_text())
    digest = state.pop("fitted_sha256")
    state_file.write_text(json.dumps(state))
    assert _run(quality, tmp_path, *options, "--n-test", "2") == 0
    lines, state = _cell(tmp_path, "personalized", "0.5")
    assert state["fitted_sha256"] == digest and len(lines) == 1 + 2

    # ... and is refused when it does not (as if another fit had made the stored certificate).
    tsv = tmp_path / "results" / "certificates-personalized-sigma0.5.tsv"
    original = tsv.read_text()
    header, first, *rest = original.splitlines()
    fields = first.split("\t")
    fields[-1] = str(int(fields[-1]) - 1)  # one fewer sample counted for the top class
    tsv.write_text("\n".join([header, "\t".join(fields), *rest]) + "\n")
    state.pop("fitted_sha256")
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert _run(quality, tmp_path, *options, "--n-test", "3") == 2
    assert "does not reproduce the first certificates of personalized" in capsys.readouterr().err
    assert tsv.read_text().splitlines()[1] == "\t".join(fields)  # refused: nothing rewritten
    tsv.write_text(original)

    # A recorded digest that the fit no longer has (the weights changed): refused at once, and
    # --restart starts the cell again with the new fit.
    before = _cell(tmp_path, "full_data", "0.5")[1]["fitted_sha256"]
    model = tmp_path / "work" / "sigma-0.5" / "full_data" / "model"
    weights = sorted(model.rglob("*.safetensors"))[0]
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 2 + 1
    save_file(tensors, weights)
    assert _run(quality, tmp_path, *options, "--n-test", "3") == 2
    assert (
        "is not the one the 2 certificates of full_data at sigma=0.5 were made with"
        in capsys.readouterr().err
    )
    assert _run(quality, tmp_path, *options, "--n-test", "3", "--restart") == 0
    lines, state = _cell(tmp_path, "full_data", "0.5")
    assert len(lines) == 1 + 3 and state["images"] == 3 and state["fitted_sha256"] != before
    # Certified again from the first test image, while the other cell kept its certificates.
    again = read_tsv(tmp_path / "results" / "certificates-full_data-sigma0.5.tsv")
    assert [r.index for r in again] == stratified_order()[:3].tolist()
    assert tsv.read_text() != original and len(read_tsv(tsv)) == 3


def test_a_run_whose_work_directory_is_gone_continues_with_the_kept_fits(quality, tmp_path, monkeypatch):
    import shutil

    from nodata_defense.robustifier import Robustifier

    options = ("--sigmas", "0.5", "--rows", "personalized", "full_method", "full_data")
    assert _run(quality, tmp_path, *options, "--n-test", "1") == 0
    for kind, row in (("synthetic", "personalized"), ("full_data", "full_data")):
        kept = tmp_path / "results" / "fits" / "sigma-0.5" / kind
        work = tmp_path / "work" / "sigma-0.5" / kind
        assert quality.fitted_digest(kept / "model") == _cell(tmp_path, row, "0.5")[1]["fitted_sha256"]
        assert (kept / "fit.json").read_bytes() == (work / "fit.json").read_bytes()
    recorded = {row: _cell(tmp_path, row, "0.5")[1]["fitted_sha256"] for row in options[3:]}

    shutil.rmtree(tmp_path / "work")

    def fit_again(*args, **kwargs):
        raise AssertionError("fitted again although a kept fit matches the settings")

    monkeypatch.setattr(Robustifier, "fit", fit_again)
    assert _run(quality, tmp_path, *options, "--n-test", "2") == 0
    for row, digest in recorded.items():
        lines, state = _cell(tmp_path, row, "0.5")
        assert len(lines) == 1 + 2 and state["images"] == 2 and state["fitted_sha256"] == digest
    assert not list((tmp_path / "results" / "fits").rglob(".*.tmp"))


def test_fitted_digest_follows_the_tensors_not_the_file_bytes(quality, tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.steps": torch.tensor(3)}
    for name, metadata in (("one", {"x": "1", "y": "2"}), ("two", {"y": "2", "x": "1", "z": "3"})):
        (tmp_path / name / "lora").mkdir(parents=True)
        save_file(tensors, tmp_path / name / "lora" / "adapter.safetensors", metadata=metadata)
    one, two = (quality.fitted_digest(tmp_path / name) for name in ("one", "two"))
    files = [(tmp_path / name / "lora" / "adapter.safetensors").read_bytes() for name in ("one", "two")]
    assert files[0] != files[1] and one == two and len(one) == 64

    tensors["b.weight"][1, 2] += 1e-6
    save_file(tensors, tmp_path / "two" / "lora" / "adapter.safetensors")
    changed = quality.fitted_digest(tmp_path / "two")
    assert changed != one
    # The same bytes under another dtype are other weights too.
    save_file(
        {"b.weight": tensors["b.weight"].view(torch.int32), "a.steps": tensors["a.steps"]},
        tmp_path / "two" / "lora" / "adapter.safetensors",
    )
    assert quality.fitted_digest(tmp_path / "two") != changed
