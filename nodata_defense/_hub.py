"""Hub plumbing shared by ``Robustifier`` and ``RobustModel``: bundled model ids, snapshot
downloads, library versions, and one clear error when the Hugging Face Hub cannot be reached."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .config import BUNDLED_CLASSIFIER_ID, BUNDLED_DENOISER_ID, BUNDLED_T2I_ID

# What a hub id looks like ("name" or "org/name"); anything else is a local path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Error texts of transformers / diffusers when they could not reach the Hub (they do not always
# chain the network exception).
_CONNECTION_TEXTS = ("couldn't connect", "could not connect", "connection refused", "failed to establish")


class HubUnreachableError(ConnectionError):
    """The Hugging Face Hub (``HF_ENDPOINT``) could not be reached for ``repo_id``."""

    def __init__(self, repo_id: str, action: str, error: BaseException | None = None) -> None:
        self.repo_id = repo_id
        self.endpoint = hub_endpoint()
        detail = f" ({type(error).__name__}: {_first_line(error)})" if error is not None else ""
        super().__init__(
            f"could not {action} {repo_id!r}: the Hugging Face Hub at {self.endpoint} is unreachable{detail}."
            " Check the network or HF_ENDPOINT, pass a local directory instead of a Hub id, or use files already"
            " in the Hugging Face cache (HF_HUB_OFFLINE=1)."
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def looks_like_repo_id(source: str) -> bool:
    """True for ``"name"`` / ``"org/name"`` strings that are not an existing local path."""
    return bool(_REPO_ID.match(source)) and not os.path.exists(source)


def bundled_path(model_id: str | None) -> Path | None:
    """Directory of a bundled model addressed by its id (e.g. ``"nodata-defense/digits-t2i"``)."""
    if model_id == BUNDLED_T2I_ID:
        from .zoo import digit_t2i_path

        return digit_t2i_path()
    if model_id == BUNDLED_DENOISER_ID:
        from .zoo import digit_denoiser_path

        return digit_denoiser_path()
    if model_id == BUNDLED_CLASSIFIER_ID:
        from .zoo.models import DIGIT_CNN_DIR

        return DIGIT_CNN_DIR
    return None


def is_connection_error(error: BaseException) -> bool:
    """Whether ``error`` (or an exception in its chain) says the Hub could not be reached."""
    try:
        import httpx2

        transport: tuple[type[BaseException], ...] = (httpx2.TransportError,)
    except ImportError:  # pragma: no cover - older huggingface_hub versions use httpx / requests
        transport = ()
    try:
        import httpx

        transport += (httpx.TransportError,)
    except ImportError:  # pragma: no cover
        pass
    from huggingface_hub.errors import OfflineModeIsEnabled

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (*transport, ConnectionError, TimeoutError, OfflineModeIsEnabled)):
            return True
        if isinstance(current, OSError) and any(t in str(current).lower() for t in _CONNECTION_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextlib.contextmanager
def hub_errors(repo_id: str, action: str) -> Iterator[None]:
    """Turn any network failure inside the block into a :class:`HubUnreachableError`."""
    try:
        yield
    except HubUnreachableError:
        raise
    except Exception as error:
        if is_connection_error(error):
            raise HubUnreachableError(repo_id, action, error) from error
        raise


def hub_answers(
    repo_id: str, *, revision: str | None = None, token: str | bool | None = None
) -> BaseException | None:
    """One quick request to the Hub about ``repo_id``: ``None`` when it answered (whatever the
    answer: a missing or gated repo is for the real loader to report), else the network error.

    huggingface_hub retries a refused download for ~20 s per file and diffusers then reports a
    missing file; this check lets callers fail at once with a clear error instead.
    """
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        HfApi(token=token).repo_info(repo_id, revision=revision, timeout=10)
    except Exception as error:
        if is_connection_error(error):
            return error
    return None


def is_cached(repo_id: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the Hugging Face cache holds a snapshot of the model repo ``repo_id``."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    root = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    snapshots = root / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def ensure_reachable(repo_id: str, action: str, *, revision: str | None = None) -> None:
    """Raise :class:`HubUnreachableError` at once when ``repo_id`` is a Hub id, the Hub does not
    answer and the cache holds no copy of it (with a cached copy the loaders fall back to it)."""
    if not looks_like_repo_id(repo_id):
        return
    error = hub_answers(repo_id, revision=revision)
    if error is not None and not is_cached(repo_id):
        raise HubUnreachableError(repo_id, action, error) from error


def library_versions() -> dict[str, str]:
    """Versions of the libraries a saved model depends on (recorded in its config.json)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("nodata-defense", "torch", "diffusers", "transformers", "peft", "huggingface_hub"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            if name == "nodata-defense":
                from . import __version__

                versions[name] = __version__
    return versions
