"""A tiny in-memory Hugging Face Hub for tests: just the endpoints huggingface_hub uses to push a
folder (regular, non-LFS uploads) and to download a snapshot, served on 127.0.0.1 only.

Endpoints (huggingface_hub 2.x):

- ``POST /api/repos/create`` (``create_repo``; 409 when the repo exists);
- ``POST /api/validate-yaml`` (README.md metadata check before a commit);
- ``GET /api/agent-harnesses`` (a registry huggingface_hub reads for its user agent; empty);
- ``POST /api/models/{repo}/preupload/{rev}``: every file is declared ``"regular"``, so file
  contents travel base64-encoded inside the commit (no LFS, no Xet);
- ``POST /api/models/{repo}/commit/{rev}``: the NDJSON commit (``header``, ``file``,
  ``deletedFile``, ``deletedFolder``);
- ``GET /api/models/{repo}[/revision/{rev}]`` (``repo_info``: ``sha`` and ``siblings``);
- ``GET /api/models/{repo}/tree/{rev}`` (``list_repo_tree``, single page);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``ETag``, ``X-Repo-Commit`` and
  ``Content-Length`` headers (``hf_hub_download``).

Anything else answers 404 and is recorded in ``HubServer.unhandled``. The server stops when its
context exits, or by itself after ``lifetime`` seconds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(r"^/api/agent-harnesses$"), "agent_harnesses"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?P<sub>/.*)?$"), "tree"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/revision/(?P<rev>[^/]+)$"), "repo_info"),
    ("GET", re.compile(rf"^/api/models/{_REPO}$"), "repo_info"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    head: str = ""


class HubServer:
    """In-memory Hub on ``http://127.0.0.1:<port>``; use as a context manager."""

    def __init__(self, lifetime: float = 120.0) -> None:
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._lifetime = lifetime
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                hub._dispatch(self, "GET")

            def do_HEAD(self) -> None:
                hub._dispatch(self, "HEAD")

            def do_POST(self) -> None:
                hub._dispatch(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HubServer:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._thread.join(timeout=5)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            repo = self.repos[repo_id]
            return dict(repo.commits[repo.head if revision == "main" else revision])

    # ---------------------------------------------------------------------------------- plumbing
    def _dispatch(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(handler.path)
        path = unquote(url.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self._lock:
            self.requests.append((method, path))
            for route_method, pattern, name in _ROUTES:
                match = pattern.match(path)
                if route_method == method and match:
                    status, headers, payload = getattr(self, "_" + name)(match.groupdict(), body)
                    break
            else:
                self.unhandled.append((method, path))
                status, headers, payload = (
                    404,
                    {},
                    json.dumps({"error": f"no route {method} {path}"}).encode(),
                )
        handler.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(payload)))
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(payload)

    @staticmethod
    def _json(status: int, obj: object, headers: dict[str, str] | None = None) -> tuple:
        return status, dict(headers or {}), json.dumps(obj).encode()

    def _repo(self, repo_id: str) -> _Repo | None:
        return self.repos.get(repo_id)

    def _not_found(self, repo_id: str) -> tuple:
        return self._json(404, {"error": f"Repository {repo_id} not found"}, {"X-Error-Code": "RepoNotFound"})

    def _snapshot(self, repo: _Repo, rev: str) -> tuple[str, dict[str, bytes]] | None:
        sha = repo.head if rev == "main" else rev
        return (sha, repo.commits[sha]) if sha in repo.commits else None

    # ---------------------------------------------------------------------------------- endpoints
    def _create_repo(self, params: dict, body: bytes) -> tuple:
        data = json.loads(body or b"{}")
        repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        sha = hashlib.sha1(f"init:{repo_id}".encode()).hexdigest()
        self.repos[repo_id] = _Repo(commits={sha: {}}, head=sha)
        return self._json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, params: dict, body: bytes) -> tuple:
        return self._json(200, {"errors": [], "warnings": []})

    def _agent_harnesses(self, params: dict, body: bytes) -> tuple:
        # huggingface_hub fetches this registry (best effort) for its user agent: an empty one.
        return self._json(200, {"standardEnvVars": [], "harnesses": {}})

    def _preupload(self, params: dict, body: bytes) -> tuple:
        if self._repo(params["repo"]) is None:
            return self._not_found(params["repo"])
        files = json.loads(body)["files"]
        return self._json(
            200,
            {
                "files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                    for f in files
                ]
            },
        )

    def _commit(self, params: dict, body: bytes) -> tuple:
        repo = self._repo(params["repo"])
        if repo is None:
            return self._not_found(params["repo"])
        if params["rev"] != "main":
            return self._json(400, {"error": "this test hub only commits to main"})
        files = dict(repo.commits[repo.head])
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            elif key != "header":
                return self._json(400, {"error": f"this test hub does not support {key!r} operations"})
        digest = hashlib.sha1(repo.head.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + files[path])
        sha = digest.hexdigest()
        repo.commits[sha] = files
        repo.head = sha
        return self._json(
            200,
            {
                "commitUrl": f"{self.endpoint}/{params['repo']}/commit/{sha}",
                "commitOid": sha,
                "pullRequestUrl": None,
            },
        )

    def _repo_info(self, params: dict, body: bytes) -> tuple:
        repo = self._repo(params["repo"])
        if repo is None:
            return self._not_found(params["repo"])
        snap = self._snapshot(repo, params.get("rev") or "main")
        if snap is None:
            return self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
        sha, files = snap
        siblings = [{"rfilename": p} for p in sorted(files)]
        return self._json(200, {"id": params["repo"], "sha": sha, "siblings": siblings, "private": False})

    def _tree(self, params: dict, body: bytes) -> tuple:
        repo = self._repo(params["repo"])
        if repo is None:
            return self._not_found(params["repo"])
        snap = self._snapshot(repo, params["rev"])
        if snap is None:
            return self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
        prefix = (params.get("sub") or "").strip("/")
        entries = [
            {"type": "file", "path": p, "size": len(c), "oid": git_blob_sha1(c)}
            for p, c in sorted(snap[1].items())
            if not prefix or p.startswith(prefix + "/")
        ]
        return self._json(200, entries)

    def _resolve(self, params: dict, body: bytes) -> tuple:
        repo = self._repo(params["repo"])
        if repo is None:
            return self._not_found(params["repo"])
        snap = self._snapshot(repo, params["rev"])
        if snap is None:
            return self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
        sha, files = snap
        content = files.get(params["path"])
        if content is None:
            return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha1(content)}"',
            "X-Repo-Commit": sha,
        }
        return 200, headers, content
