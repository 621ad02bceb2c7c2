"""A stand-in for the Hugging Face Hub on 127.0.0.1, so that the online path is tested without the internet.

It answers, from files held in memory, the part of the Hub's HTTP API that huggingface_hub (snapshot_download,
hf_hub_download, HfFileSystem) and datasets (load_dataset, streaming too) call to download a repo:

    GET  /api/{models|datasets}/{repo_id}[/revision/{rev}]       repo info: id, sha (the commit), siblings
    GET  /api/{models|datasets}/{repo_id}/tree/{rev}[/{path}]    the files under a folder (?recursive=true)
    POST /api/{models|datasets}/{repo_id}/paths-info/{rev}       the entries of the given paths
    HEAD|GET /{repo_id}/resolve/{rev}/{path}                     a model repo's file; datasets/{repo_id}/... for a
                                                                 dataset's. Headers as the Hub's: ETag (sha256 for
                                                                 LFS-tracked files, X-Linked-Etag too), X-Repo-Commit,
                                                                 Content-Length, Accept-Ranges; Range requests -> 206
    HEAD /                                                       200 (what a reachability check asks)

A missing repo, revision or file gets a 404 with the Hub's X-Error-Code (RepoNotFound, RevisionNotFound,
EntryNotFound), which huggingface_hub turns into its own errors. A request line with an absolute URL
("GET http://hub.invalid/api/... HTTP/1.1") is served too, as a plain-HTTP forward proxy would: tests point
HTTP_PROXY here to check that a client goes through the proxy.

Bounded and local: it binds 127.0.0.1 on a free port, answers at most `max_requests` requests (then 503),
and shuts itself down after `lifetime_s` seconds if the test has not stopped it. `requests` records
(method, path, Range header, proxied) of every request, for tests to check what was downloaded.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.parquet", "*.msgpack")  # stored through Git LFS on the real Hub


@dataclass
class Repo:
    """The files of one repo at one commit: {path in repo: content}."""

    files: Dict[str, bytes]
    sha: str = ""

    def __post_init__(self):
        if not self.sha:  # a commit id that changes with the content, as a git commit's would
            digest = hashlib.sha1()
            for path in sorted(self.files):
                digest.update(path.encode() + b"\0" + hashlib.sha1(self.files[path]).digest())
            self.sha = digest.hexdigest()

    def entry(self, path: str) -> Optional[dict]:
        """The tree/paths-info entry of a file or folder, or None."""
        if path in self.files:
            content = self.files[path]
            entry = {"type": "file", "path": path, "size": len(content), "oid": _git_blob_sha(content)}
            if _is_lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
            return entry
        if any(name.startswith(path.rstrip("/") + "/") for name in self.files):
            return {"type": "directory", "path": path.rstrip("/"), "oid": hashlib.sha1(path.encode()).hexdigest(),
                    "size": 0}
        return None

    def tree(self, folder: str, recursive: bool) -> List[dict]:
        """Entries under `folder` ("" for the root): all files (and folders) below it, or its direct children."""
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        names = set()
        for path in self.files:
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            names.update(prefix + "/".join(parts[:depth]) for depth in range(1, len(parts) + 1)
                         if recursive or depth == 1)
        return [self.entry(name) for name in sorted(names)]


def _git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _is_lfs(path: str) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in LFS_PATTERNS)


class HubServer:
    """The stand-in Hub. repos: {("model" | "dataset", repo_id): Repo}; aliases: {old id: repo id}, which
    get a 307 redirect to the same URL with the repo id, as the Hub answers for repos that moved. Use as a
    context manager, or start() / stop(); `endpoint` is the value for HF_ENDPOINT."""

    def __init__(self, repos: Dict[Tuple[str, str], Repo], aliases: Optional[Dict[str, str]] = None,
                 max_requests: int = 5000, lifetime_s: float = 600.0):
        self.repos = repos
        self.aliases = aliases or {}  # old id -> repo id, answered with a redirect ("gpt2" -> "openai-community/gpt2")
        self.max_requests = max_requests
        self.lifetime_s = lifetime_s
        self.requests: List[Tuple[str, str, Optional[str], bool]] = []
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._threads: List[threading.Thread] = []
        self._timer: Optional[threading.Timer] = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # loopback only, a free port
        self._server.daemon_threads = True
        thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        thread.start()
        self._threads.append(thread)
        self._timer = threading.Timer(self.lifetime_s, self.stop)  # never outlive a forgotten test
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self):
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def downloaded(self, repo_id: str, repo_type: str = "model") -> List[str]:
        """The paths of the repo's files whose content was requested (GET on the resolve endpoint)."""
        prefix = ("/datasets/" if repo_type == "dataset" else "/") + repo_id + "/resolve/"
        paths = []
        for method, path, _, _ in self.requests:
            if method == "GET" and path.startswith(prefix):
                name = unquote(path[len(prefix):].split("?")[0]).split("/", 1)[1]
                if name not in paths:
                    paths.append(name)
        return paths


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client expects; every answer has a length

    def log_message(self, format, *args):  # quiet: the tests read hub.requests instead
        pass

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str):
        proxied = self.path.startswith(("http://", "https://"))
        target = urlsplit(self.path)
        path = target.path + (f"?{target.query}" if target.query else "")
        with self.hub._lock:
            self.hub.requests.append((method, path, self.headers.get("Range"), proxied))
            too_many = len(self.hub.requests) > self.hub.max_requests
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if too_many:
            return self._send(503, b"request limit reached", error_code="TooManyRequests")
        try:
            self._route(method, target.path, parse_qs(target.query), body)
        except Exception as error:  # a bug here must show in the test, not hang the client
            self._send(500, f"{type(error).__name__}: {error}".encode())

    def _route(self, method: str, path: str, query: dict, body: bytes):
        if path in ("", "/"):
            return self._send(200, b"gpt2lite test hub")
        if path.startswith("/api/"):
            kind, _, rest = path[len("/api/"):].partition("/")
            repo_type = {"models": "model", "datasets": "dataset"}.get(kind)
            if repo_type is None:
                return self._send(404, b"unknown API", error_code="EntryNotFound")
            return self._api(method, repo_type, unquote(rest), query, body)
        repo_type = "model"
        if path.startswith("/datasets/"):
            repo_type, path = "dataset", path[len("/datasets"):]
        repo_id, marker, rest = unquote(path.lstrip("/")).partition("/resolve/")
        if not marker:
            return self._send(404, b"not found", error_code="EntryNotFound")
        revision, _, file_path = rest.partition("/")
        return self._resolve(method, repo_type, repo_id, revision, file_path)

    def _repo(self, repo_type: str, repo_id: str, revision: str) -> Optional[Repo]:
        if repo_id in self.hub.aliases:
            old = urlsplit(self.path)
            path = re.sub(rf"/{re.escape(repo_id)}(?=/|$)", "/" + self.hub.aliases[repo_id], old.path, count=1)
            self._send(307, b"moved", extra={"Location": path + (f"?{old.query}" if old.query else "")})
            return None
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None:
            self._send(404, f"Repository {repo_id} not found".encode(), error_code="RepoNotFound")
        elif revision not in ("main", repo.sha):
            self._send(404, f"Revision {revision} not found".encode(), error_code="RevisionNotFound",
                       commit=repo.sha)
            return None
        return repo

    def _api(self, method: str, repo_type: str, rest: str, query: dict, body: bytes):
        for action in ("/revision/", "/tree/", "/paths-info/"):
            repo_id, marker, tail = rest.partition(action)
            if marker:
                break
        else:
            repo_id, action, tail = rest.rstrip("/"), "/revision/", "main"
        revision, _, folder = tail.partition("/")
        repo = self._repo(repo_type, repo_id, revision)
        if repo is None:
            return
        if action == "/revision/":
            info = {"id": repo_id, "sha": repo.sha, "private": False, "gated": False, "disabled": False,
                    "tags": [], "siblings": [{"rfilename": name} for name in sorted(repo.files)],
                    "lastModified": "2024-01-01T00:00:00.000Z"}
            return self._send_json(info)
        if action == "/tree/":
            entries = repo.tree(folder, query.get("recursive", ["false"])[0].lower() == "true")
            if folder and not entries:
                return self._send(404, f"{folder} not found".encode(), error_code="EntryNotFound", commit=repo.sha)
            return self._send_json(entries)
        paths = parse_qs(body.decode()).get("paths", [])  # a form: paths=a&paths=b
        return self._send_json([entry for entry in map(repo.entry, paths) if entry is not None])

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, file_path: str):
        repo = self._repo(repo_type, repo_id, revision)
        if repo is None:
            return
        if file_path not in repo.files:
            return self._send(404, f"{file_path} not found".encode(), error_code="EntryNotFound", commit=repo.sha)
        content = repo.files[file_path]
        etag = hashlib.sha256(content).hexdigest() if _is_lfs(file_path) else _git_blob_sha(content)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if _is_lfs(file_path):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(content))})
        status, part = 200, content
        byte_range = self.headers.get("Range")
        if byte_range and byte_range.startswith("bytes="):
            first, _, last = byte_range[len("bytes="):].split(",")[0].partition("-")
            if first == "":  # a suffix: the last N bytes
                start, end = max(0, len(content) - int(last)), len(content) - 1
            else:
                start, end = int(first), min(int(last) if last else len(content) - 1, len(content) - 1)
            if start >= len(content):
                return self._send(416, b"", extra={"Content-Range": f"bytes */{len(content)}"})
            status, part = 206, content[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        self._send(status, part if method == "GET" else b"", extra=headers, length=len(part))

    def _send_json(self, value):
        self._send(200, json.dumps(value).encode(), extra={"Content-Type": "application/json"})

    def _send(self, status: int, body: bytes, error_code: Optional[str] = None, commit: Optional[str] = None,
              extra: Optional[dict] = None, length: Optional[int] = None):
        self.send_response(status)
        headers = dict(extra or {})
        if error_code:
            headers.update({"X-Error-Code": error_code, "X-Error-Message": body.decode(errors="replace")})
        if commit:
            headers["X-Repo-Commit"] = commit
        headers.setdefault("Content-Type", "text/plain")
        headers["Content-Length"] = str(len(body) if length is None else length)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
