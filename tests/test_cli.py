"""The ``nodata-defense`` command line: info, certify, the demo hook, --help."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from robust_fixtures import assemble, save_tiny_t2i
from tiny_models import TinyCNN

from nodata_defense.cli import main, read_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("model") / "robust"
    assemble(save_tiny_t2i(tmp_path_factory.mktemp("t2i")), TinyCNN(), "full").save_pretrained(directory)
    return directory


@pytest.fixture
def image_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for name, size in (("b.png", 16), ("a.png", 20)):  # a.png is resized to the model's 16x16
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_help_works():
    result = subprocess.run(
        [sys.executable, "-m", "nodata_defense.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "certify" in result.stdout and "info" in result.stdout


def test_info_prints_the_saved_config(saved, capsys):
    assert main(["info", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "sigma" in out and "0.25" in out and "TinyCNN (user)" in out and "adaptation" in out
    assert main(["info", str(saved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_names"] == ["zero", "one", "two"]


def test_certify_a_folder_of_images(saved, image_dir, tmp_path, capsys):
    out_file = tmp_path / "certificates.json"
    argv = ["certify", str(saved), str(image_dir), "--n0", "5", "--n", "20", "--batch-size", "16"]
    status = main([*argv, "--classifier-factory", "tiny_models:TinyCNN", "--output", str(out_file)])
    assert status == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["image", "label", "radius", "pA_lower"]
    assert [line.split()[0] for line in printed[1:]] == ["a.png", "b.png"]
    rows = json.loads(out_file.read_text())["certificates"]
    assert [r["image"] for r in rows] == ["a.png", "b.png"] and all(r["n"] == 20 for r in rows)


def test_certify_explains_how_to_pass_a_classifier(saved, image_dir, capsys):
    assert main(["certify", str(saved), str(image_dir), "--n", "5"]) == 1
    assert "--classifier-factory MODULE:FUNCTION" in capsys.readouterr().err


def test_read_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no image file"):
        read_images(tmp_path, (1, 8, 8))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        read_images(tmp_path / "missing", (1, 8, 8))


def test_demo_hook_forwards_its_arguments_or_says_it_is_missing(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("nodata_defense.demo")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "nodata_defense.demo", fake)
    assert main(["demo", "--quick", "--seed", "3"]) == 0
    assert seen == [["--quick", "--seed", "3"]]

    monkeypatch.setitem(sys.modules, "nodata_defense.demo", None)
    assert main(["demo"]) == 1
    assert "demo is not available" in capsys.readouterr().err
