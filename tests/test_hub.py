"""push_to_hub / from_pretrained against a local Hub-compatible server, and an unreachable Hub.

Everything talks to 127.0.0.1 only (tests/hub_server.py); nothing reaches the real Hub.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
from hub_server import HubServer
from robust_fixtures import CLASS_NAMES, assemble, images, save_tiny_t2i, without_time
from tiny_models import TinyCNN

from nodata_defense import HubUnreachableError, Robustifier, RobustModel

SAVED = {
    "README.md",
    "config.json",
    "denoiser_lora/adapter_config.json",
    "denoiser_lora/adapter_model.safetensors",
    "classifier_adapter/classifier_adapter.json",
    "classifier_adapter/classifier_adapter.safetensors",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def robust(tmp_path_factory) -> RobustModel:
    return assemble(save_tiny_t2i(tmp_path_factory.mktemp("t2i")), TinyCNN(), "full")


def point_hub_at(monkeypatch, endpoint: str, tmp_path: Path) -> None:
    """huggingface_hub reads HF_ENDPOINT once at import; its module constants are what calls use."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    # Keep huggingface_hub's small registry cache out of the user's HF_HOME.
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer(lifetime=120) as server:
        point_hub_at(monkeypatch, server.endpoint, tmp_path)
        yield server
    assert server.unhandled == [], f"requests the test hub does not implement: {server.unhandled}"


@pytest.fixture
def dead_endpoint(monkeypatch, tmp_path) -> str:
    """A local port with nothing listening: every connection is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    point_hub_at(monkeypatch, endpoint, tmp_path)
    return endpoint


# --------------------------------------------------------------------------------- a working Hub
def test_push_to_hub_then_from_pretrained_gives_identical_results(robust, hub, tmp_path):
    url = robust.push_to_hub("tester/robust-tiny", token="test-token", commit_message="first upload")
    assert url.startswith(f"{hub.endpoint}/tester/robust-tiny/commit/")
    files = hub.files("tester/robust-tiny")
    assert set(files) == SAVED
    assert b'RobustModel.from_pretrained("tester/robust-tiny", classifier=model)' in files["README.md"]
    assert b"library_name: nodata-defense" in files["README.md"]

    loaded = RobustModel.from_pretrained(
        "tester/robust-tiny", cache_dir=tmp_path / "cache", classifier=TinyCNN()
    )
    x = images(2, seed=9)
    assert without_time(loaded.certify(x, n0=10, n=40, generator=5)) == without_time(
        robust.certify(x, n0=10, n=40, generator=5)
    )
    assert loaded.config == robust.config


def test_a_pinned_revision_loads_that_commit(robust, hub, tmp_path):
    first = robust.push_to_hub("tester/versions", token="test-token").rsplit("/", 1)[-1]
    changed = RobustModel(
        robust.classifier, robust.denoiser, sigma=0.25, class_names=CLASS_NAMES, info=robust.config
    )
    changed.certified_accuracy = {
        "radii": [0.0],
        "accuracy": [0.5],
        "sigma": 0.25,
        "n0": 10,
        "n": 100,
        "alpha": 0.001,
        "num_images": 2,
    }
    changed.push_to_hub("tester/versions", token="test-token")
    latest = RobustModel.from_pretrained("tester/versions", cache_dir=tmp_path / "c", classifier=TinyCNN())
    pinned = RobustModel.from_pretrained(
        "tester/versions", revision=first, cache_dir=tmp_path / "c", classifier=TinyCNN()
    )
    assert latest.certified_accuracy is not None and pinned.certified_accuracy is None


def test_a_missing_repo_is_reported_as_missing_not_unreachable(hub, tmp_path):
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError, match="tester/missing"):
        RobustModel.from_pretrained("tester/missing", cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------ an unreachable Hub
def test_unreachable_hub_gives_a_clear_error_naming_repo_and_endpoint(robust, dead_endpoint, tmp_path):
    started = time.monotonic()
    with pytest.raises(HubUnreachableError, match=rf"'tester/robust-tiny'.*{dead_endpoint} is unreachable"):
        RobustModel.from_pretrained("tester/robust-tiny", cache_dir=tmp_path / "cache", classifier=TinyCNN())
    with pytest.raises(HubUnreachableError, match=rf"push the robust model to 'tester/x'.*{dead_endpoint}"):
        robust.push_to_hub("tester/x", token="test-token")
    assert time.monotonic() - started < 30  # refused connections fail fast; no retry loop


def test_paper_default_models_need_the_hub_and_say_so(dead_endpoint, monkeypatch, tmp_path):
    from huggingface_hub import constants

    from nodata_defense import as_image_classifier
    from nodata_defense.synthesis import CallableGenerator

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    rgb = as_image_classifier(TinyCNN(channels=3))  # 3-channel images: the paper's IF models are the default
    started = time.monotonic()
    with pytest.raises(
        HubUnreachableError, match=rf"'DeepFloyd/IF-I-XL-v1.0'.*{dead_endpoint} is unreachable"
    ):
        Robustifier(rgb, CLASS_NAMES).fit()
    noise = CallableGenerator(lambda prompts, g: torch.rand(len(prompts), 3, 16, 16, generator=g), id="noise")
    fast = {"synthesis": {"num_inference_steps": 1}}
    with pytest.raises(
        HubUnreachableError, match=rf"load the denoiser 'DeepFloyd/IF-II-L-v1.0'.*{dead_endpoint}"
    ):
        Robustifier(rgb, CLASS_NAMES, generator=noise, config=fast).fit()
    assert time.monotonic() - started < 30  # one refused request each, no retry loop


def test_a_cached_model_still_loads_when_the_hub_goes_away(robust, monkeypatch, tmp_path):
    with HubServer(lifetime=60) as server:
        point_hub_at(monkeypatch, server.endpoint, tmp_path)
        robust.push_to_hub("tester/cached", token="test-token")
        RobustModel.from_pretrained("tester/cached", cache_dir=tmp_path / "cache", classifier=TinyCNN())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    point_hub_at(monkeypatch, dead, tmp_path)
    started = time.monotonic()
    offline = RobustModel.from_pretrained("tester/cached", cache_dir=tmp_path / "cache", classifier=TinyCNN())
    assert time.monotonic() - started < 30
    assert offline.config == robust.config


@pytest.mark.slow
def test_the_usage_line_exactly_as_written_on_the_bundled_digits(monkeypatch, tmp_path):
    """The four calls of README's usage paragraph, verbatim, with every default (the bundled
    generator and denoiser, the paper's fit settings and certification settings); the Hub is the
    local test server and the token comes from the environment, as it would for a user."""
    from nodata_defense.zoo import DIGIT_CLASS_NAMES, load_digit_classifier, load_digits

    monkeypatch.setenv("HF_TOKEN", "test-token")
    model, class_names = load_digit_classifier(), list(DIGIT_CLASS_NAMES)
    test = load_digits("test")
    x, labels = test.images[:3], test.labels[:3].tolist()

    with HubServer(lifetime=900) as hub:  # the fit with the paper's defaults takes minutes
        point_hub_at(monkeypatch, hub.endpoint, tmp_path)
        robust = Robustifier(model, class_names, sigma=0.25).fit()
        predictions = robust.predict(x)
        certificates = robust.certify(x, sigma=0.25)
        robust.push_to_hub("org/name")
        files = set(hub.files("org/name"))
        # The bundled classifier is known by id: nothing needs to be passed again to load it.
        loaded = RobustModel.from_pretrained("org/name", cache_dir=tmp_path / "cache")
    assert hub.unhandled == [], f"requests the test hub does not implement: {hub.unhandled}"

    assert [p.label for p in predictions] == labels  # easy digits at sigma = 0.25
    assert [c.label for c in certificates] == labels
    assert all(c.n == 10_000 and c.n0 == 100 and c.alpha == 0.001 and c.radius > 0.25 for c in certificates)
    assert files == SAVED
    assert without_time(loaded.certify(x, n0=10, n=100, generator=1)) == without_time(
        robust.certify(x, n0=10, n=100, generator=1)
    )
