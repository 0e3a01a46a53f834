"""A minimal local Hugging Face Hub for tests: the HTTP endpoints ``huggingface_hub`` 2.4 calls, nothing more.

Repositories live in a directory with git-like history: every commit is a JSON file naming its parent and its tree
(path -> blob), content is stored once per git blob id, branches and tags are ref files. The server speaks the
Hub's protocol closely enough for the real client code (``hf_hub_download``, ``snapshot_download``,
``ModelHubMixin.from_pretrained``/``push_to_hub``, ``transformers``/``diffusers`` ``from_pretrained``) to run
unchanged against it:

- ``HEAD``/``GET /{repo}/resolve/{revision}/{path}``: a branch or tag answers ``307`` to the commit-pinned URL;
  a commit answers the file with ``X-Repo-Commit``, ``ETag`` (git blob id, or sha256 for LFS-tracked files, which
  also get ``X-Linked-Etag``/``X-Linked-Size``) and ``Content-Length``.
- ``GET /api/models/{repo}[/revision/{revision}]``: repo info (``sha``, ``siblings``; sizes with ``?blobs=true``).
- ``GET /api/models/{repo}/tree/{revision}[/{path}]``: the tree listing (``?recursive=true``), one page.
- ``POST /api/repos/create``, ``POST /api/validate-yaml``, ``POST /api/models/{repo}/preupload/{revision}`` and
  ``POST /api/models/{repo}/commit/{revision}`` (NDJSON: header, base64 files, LFS files, deletions).
- The large-file path, as the real Hub: preupload answers ``"lfs"`` for LFS-tracked files (``*.safetensors`` and the
  other ``.gitattributes`` patterns, or 10 MiB and more; with their sha256 as ``oid``, so unchanged files are
  skipped) and ``"regular"`` with the git blob id for the rest. The client then asks the Git LFS batch API
  (``POST /{repo}.git/info/lfs/objects/batch``, basic transfer; objects already stored get no actions and are not
  sent again), ``PUT``s each object to the upload URL it got (checked against its sha256 and size), ``POST``s the
  verify URL, and commits an ``lfsFile`` line naming the object. A regular (base64) upload of an LFS-tracked file
  is refused, as the Hub refuses it, so a test cannot pass by the small-file path. Not served: multi-part LFS
  transfers (the client uses them only when the batch answer asks for them) and Xet storage (tests set
  ``HF_HUB_DISABLE_XET``, so the client takes the LFS path).

Errors carry the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``), so the client
raises its usual exceptions. Writes need ``Authorization: Bearer <token>``. Any other endpoint answers 404 and is
recorded in ``unhandled``, so a test can assert the client needed nothing else; ``GET /api/agent-harnesses`` (the
client's agent detection, which takes a failure as "no agent") answers 404 without being recorded. The server binds
127.0.0.1 on a free port, runs in a daemon thread and stops itself after ``max_lifetime`` seconds at the latest.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack", "*.gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024  # larger files are LFS-tracked whatever their name
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
HOUSEKEEPING = {"/api/agent-harnesses"}  # client requests unrelated to repositories: 404, not "unhandled"
DATE = "2024-01-01T00:00:00.000Z"


class HubError(Exception):
    """An HTTP error answer: status, the Hub's ``X-Error-Code`` and a message; ``commit`` adds ``X-Repo-Commit``."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob (``git hash-object``), the Hub's ``oid`` of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file committed in place of an LFS-tracked file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs(path: str, size: int) -> bool:
    """Whether the Hub tracks ``path`` with LFS: it matches a ``.gitattributes`` pattern or is 10 MiB or more."""
    return size >= LFS_MIN_SIZE or any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)


class RepoStore:
    """Model repositories under ``root`` with git-like commits, branches and tags (thread-safe)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    # -- layout ------------------------------------------------------------------------------------------------
    def repo_dir(self, repo_id: str) -> Path:
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) for p in parts):
            raise HubError(404, f"Repository {repo_id!r} not found (ids are 'org/name')", "RepoNotFound")
        return self.root / "models" / parts[0] / parts[1]

    def exists(self, repo_id: str) -> bool:
        try:
            return (self.repo_dir(repo_id) / "refs" / "heads" / "main").is_file()
        except HubError:
            return False

    def _require(self, repo_id: str) -> Path:
        if not self.exists(repo_id):
            raise HubError(404, f"Repository Not Found: {repo_id}", "RepoNotFound")
        return self.repo_dir(repo_id)

    # -- reading -----------------------------------------------------------------------------------------------
    def resolve(self, repo_id: str, revision: str) -> str:
        """The commit id of a branch, tag or commit id; ``RevisionNotFound`` otherwise."""
        repo = self._require(repo_id)
        with self.lock:
            if COMMIT_RE.fullmatch(revision) and (repo / "commits" / f"{revision}.json").is_file():
                return revision
            for kind in ("heads", "tags"):
                ref = repo / "refs" / kind / revision
                if ".." not in revision and ref.is_file():
                    return ref.read_text().strip()
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def commit_info(self, repo_id: str, sha: str) -> dict:
        return json.loads((self._require(repo_id) / "commits" / f"{sha}.json").read_text())

    def tree(self, repo_id: str, sha: str) -> dict[str, dict]:
        return self.commit_info(repo_id, sha)["tree"]

    def read_blob(self, repo_id: str, entry: dict) -> bytes:
        return (self._require(repo_id) / "blobs" / entry["oid"]).read_bytes()

    def history(self, repo_id: str, branch: str = "main") -> list[str]:
        """Commit ids of ``branch``, newest first."""
        shas, sha = [], self.resolve(repo_id, branch)
        while sha is not None:
            shas.append(sha)
            sha = self.commit_info(repo_id, sha)["parent"]
        return shas

    # -- writing -----------------------------------------------------------------------------------------------
    def create_repo(self, repo_id: str) -> str:
        """Create a repository with the Hub's initial commit (a ``.gitattributes`` marking LFS patterns)."""
        with self.lock:
            if self.exists(repo_id):
                raise HubError(409, f"You already created this model repo: {repo_id}")
            repo = self.repo_dir(repo_id)
            for sub in ("refs/heads", "refs/tags", "commits", "blobs"):
                (repo / sub).mkdir(parents=True, exist_ok=True)
            attributes = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
            return self._write_commit(repo, None, "initial commit", {".gitattributes": attributes}, set(), "main")

    def commit(self, repo_id: str, files: dict[str, bytes] | str | Path, message: str = "update",
               branch: str = "main", deletions: tuple[str, ...] = (), parent: str | None = None,
               create: bool = True) -> str:
        """Commit ``files`` (a ``{path: bytes}`` dict or a folder to add recursively) on ``branch``; returns the id.

        Deletions name files or folders (``"sub/"``). ``parent`` must equal the branch head when given, as the Hub's
        ``parentCommit`` check. A missing repository is created when ``create`` is true.
        """
        if isinstance(files, (str, Path)):
            folder = Path(files)
            files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        with self.lock:
            if not self.exists(repo_id):
                if not create:
                    raise HubError(404, f"Repository Not Found: {repo_id}", "RepoNotFound")
                self.create_repo(repo_id)
            repo = self.repo_dir(repo_id)
            head = self.resolve(repo_id, branch) if (repo / "refs" / "heads" / branch).is_file() else None
            if head is None:
                raise HubError(404, f"Invalid rev id: {branch} is not a branch", "RevisionNotFound")
            if parent is not None and parent != head:
                raise HubError(412, f"A commit has happened since {parent}: the head of {branch} is {head}")
            return self._write_commit(repo, head, message, files, set(deletions), branch)

    # -- LFS objects (uploaded before the commit that names them) ----------------------------------------------
    def lfs_object(self, repo_id: str, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise HubError(400, f"invalid LFS oid {sha256!r}: expected a sha256 in hex")
        return self._require(repo_id) / "lfs" / sha256

    def has_lfs_object(self, repo_id: str, sha256: str, size: int | None = None) -> bool:
        path = self.lfs_object(repo_id, sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_lfs_object(self, repo_id: str, sha256: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise HubError(400, f"the uploaded content does not hash to its LFS oid {sha256}")
        path = self.lfs_object(repo_id, sha256)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)

    def tag(self, repo_id: str, tag: str, revision: str = "main") -> str:
        sha = self.resolve(repo_id, revision)
        (self._require(repo_id) / "refs" / "tags" / tag).write_text(sha)
        return sha

    def _write_commit(self, repo: Path, parent: str | None, message: str, files: dict[str, bytes],
                      deletions: set[str], branch: str) -> str:
        tree = dict(json.loads((repo / "commits" / f"{parent}.json").read_text())["tree"]) if parent else {}
        for path in list(tree):
            if any(path == d or (d.endswith("/") and path.startswith(d)) for d in deletions):
                del tree[path]
        for path, data in files.items():
            if path.startswith("/") or ".." in path.split("/") or not path:
                raise HubError(400, f"Invalid path in repo: {path!r}")
            oid = git_blob_id(data)
            (repo / "blobs" / oid).write_bytes(data)
            lfs = is_lfs(path, len(data))
            tree[path] = {"oid": oid, "size": len(data), "sha256": hashlib.sha256(data).hexdigest() if lfs else None}
        body = {"parent": parent, "message": message, "tree": dict(sorted(tree.items()))}
        sha = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        (repo / "commits" / f"{sha}.json").write_text(json.dumps(body, indent=1))
        (repo / "refs" / "heads" / branch).write_text(sha)
        return sha


class HubServer:
    """The HTTP front of a :class:`RepoStore`, served from a background thread on ``127.0.0.1:<free port>``.

    Args:
        root: directory of the repositories (created).
        token: the write token (``Authorization: Bearer <token>``) the server accepts.
        max_lifetime: seconds after which the server stops itself, so a hung test cannot leave it running.
    """

    def __init__(self, root: str | Path, token: str = "hf_local_test_token", max_lifetime: float = 300.0) -> None:
        self.store = RepoStore(root)
        self.token = token
        self.max_lifetime = max_lifetime
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.lfs_uploads: list[tuple[str, str]] = []  # (repo, sha256) of every object PUT through the LFS API
        self.unhandled: list[tuple[str, str]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the hub server is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> HubServer:
        if self._httpd is not None:
            return self
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="local-hub", daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.max_lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port (idempotent); later requests are refused at connect."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # convenience for seeding repositories without HTTP
    def commit(self, repo_id: str, files: dict[str, bytes] | str | Path, message: str = "update", **kwargs) -> str:
        return self.store.commit(repo_id, files, message, **kwargs)


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the store; one request per connection (HTTP/1.0), so a stopped server serves nothing."""

    hub: HubServer
    protocol_version = "HTTP/1.0"
    timeout = 30  # seconds a client may take to send its request

    def log_message(self, format, *args) -> None:  # quiet: tests read ``hub.requests`` instead
        pass

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- plumbing ----------------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.hub.requests.append((method, split.path))
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        try:
            route = self._route(method, segments)
            if route is None:
                if split.path not in HOUSEKEEPING:
                    self.hub.unhandled.append((method, self.path))
                raise HubError(404, f"no such endpoint: {method} {split.path}")
            route()
        except HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            if error.commit:
                headers["X-Repo-Commit"] = error.commit
            self._send(error.status, json.dumps({"error": error.message}).encode(), headers, method=method)

    def _route(self, method: str, s: list[str]):
        if method in ("GET", "HEAD") and len(s) >= 5 and s[2] == "resolve":
            return lambda: self._resolve(f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]), method)
        if s[:2] == ["api", "models"] and len(s) >= 4:
            repo_id, rest = f"{s[2]}/{s[3]}", s[4:]
            if method == "GET" and not rest:
                return lambda: self._repo_info(repo_id, "main")
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                return lambda: self._repo_info(repo_id, rest[1])
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return lambda: self._tree(repo_id, rest[1], "/".join(rest[2:]))
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return lambda: self._preupload(repo_id, rest[1])
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return lambda: self._commit(repo_id, rest[1])
        if method == "POST" and s == ["api", "repos", "create"]:
            return self._create_repo
        if method == "POST" and len(s) == 6 and s[1].endswith(".git") and s[2:] == ["info", "lfs", "objects", "batch"]:
            return lambda: self._lfs_batch(f"{s[0]}/{s[1].removesuffix('.git')}")
        if method == "PUT" and len(s) == 4 and s[0] == "lfs-upload":
            return lambda: self._lfs_upload(f"{s[1]}/{s[2]}", s[3])
        if method == "POST" and len(s) == 3 and s[0] == "lfs-verify":
            return lambda: self._lfs_verify(f"{s[1]}/{s[2]}")
        if method == "POST" and s == ["api", "validate-yaml"]:
            return self._validate_yaml
        return None

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json", method: str = "GET", length: int | None = None) -> None:
        """Answer with ``body`` (headers only for HEAD, with the ``Content-Length`` a GET would have)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _json(self, payload, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode())

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # a streamed upload of unknown length
            data = b""
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                data += self.rfile.read(size)
                self.rfile.readline()  # the CRLF after each chunk
            self.rfile.readline()  # the CRLF after the last, empty chunk
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _require_token(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    # -- endpoints ---------------------------------------------------------------------------------------------
    def _resolve(self, repo_id: str, revision: str, path: str, method: str) -> None:
        sha = self.hub.store.resolve(repo_id, revision)
        if sha != revision:  # branch or tag: send the client to the immutable, commit-pinned URL
            self._send(307, b"", {"Location": f"/{repo_id}/resolve/{sha}/{quote(path)}", "X-Repo-Commit": sha},
                       method=method)
            return
        entry = self.hub.store.tree(repo_id, sha).get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path} at {sha}", "EntryNotFound", commit=sha)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["sha256"] or entry["oid"]}"',
                   "Accept-Ranges": "bytes"}
        if entry["sha256"]:
            headers.update({"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(entry["size"])})
        data = self.hub.store.read_blob(repo_id, entry) if method == "GET" else b""
        self._send(200, data, headers, content_type="application/octet-stream", method=method, length=entry["size"])

    def _entry_json(self, path: str, entry: dict) -> dict:
        item = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry["sha256"]:
            pointer = lfs_pointer(entry["sha256"], entry["size"])
            item.update(oid=git_blob_id(pointer),
                        lfs={"oid": entry["sha256"], "size": entry["size"], "pointerSize": len(pointer)})
        return item

    def _repo_info(self, repo_id: str, revision: str) -> None:
        sha = self.hub.store.resolve(repo_id, revision)
        tree = self.hub.store.tree(repo_id, sha)
        blobs = self.query.get("blobs", "").lower() == "true"
        siblings = []
        for path, entry in tree.items():
            sibling = {"rfilename": path}
            if blobs:
                item = self._entry_json(path, entry)
                sibling.update(size=entry["size"], blobId=item["oid"])
                if "lfs" in item:
                    sibling["lfs"] = {"size": entry["size"], "sha256": entry["sha256"],
                                      "pointerSize": item["lfs"]["pointerSize"]}
            siblings.append(sibling)
        self._json({"_id": sha[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                    "lastModified": DATE, "createdAt": DATE, "private": False, "disabled": False, "gated": False,
                    "downloads": 0, "likes": 0, "tags": [], "siblings": siblings})

    def _tree(self, repo_id: str, revision: str, folder: str) -> None:
        sha = self.hub.store.resolve(repo_id, revision)
        tree = self.hub.store.tree(repo_id, sha)
        recursive = self.query.get("recursive", "").lower() == "true"
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in tree):
            raise HubError(404, f"Entry not found: {folder} at {sha}", "EntryNotFound", commit=sha)
        items, folders = [], set()
        for path, entry in tree.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way, once each
                sub = prefix + "/".join(parts[:depth])
                if (recursive or depth == 1) and sub not in folders:
                    folders.add(sub)
                    items.append({"type": "directory", "oid": hashlib.sha1(f"{sha}:{sub}".encode()).hexdigest(),
                                  "size": 0, "path": sub})
            if recursive or len(parts) == 1:
                items.append(self._entry_json(path, entry))
        self._json(items)

    def _create_repo(self) -> None:
        self._require_token()
        payload = json.loads(self._body() or b"{}")
        if payload.get("type") not in (None, "model"):
            raise HubError(400, f"only model repositories are served, got type {payload.get('type')!r}")
        repo_id = f"{payload.get('organization')}/{payload.get('name')}"
        url = f"{self.hub.url}/{repo_id}"
        if self.hub.store.exists(repo_id):  # the Hub's 409 names the existing repo, which create_repo(exist_ok) reads
            self._json({"error": f"You already created this model repo: {repo_id}", "url": url}, status=409)
            return
        self.hub.store.create_repo(repo_id)
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        payload = json.loads(self._body() or b"{}")
        content = payload.get("content", "")
        errors = []
        if content.startswith("---"):
            try:
                metadata = yaml.safe_load(content.split("---")[1])
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append({"message": "metadata must be a mapping"})
            except yaml.YAMLError as error:
                errors.append({"message": str(error)})
        self._json({"errors": errors, "warnings": []}, status=400 if errors else 200)

    def _preupload(self, repo_id: str, revision: str) -> None:
        self._require_token()
        payload = json.loads(self._body())
        tree = self.hub.store.tree(repo_id, self.hub.store.resolve(repo_id, revision))
        files = []
        for f in payload["files"]:
            remote = tree.get(f["path"])
            lfs = is_lfs(f["path"], int(f["size"]))
            oid = None if remote is None else (remote["sha256"] if lfs else remote["oid"])
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._json({"files": files, "commitOid": self.hub.store.resolve(repo_id, revision)})

    def _lfs_batch(self, repo_id: str) -> None:
        """Git LFS batch API, upload operation, basic transfer: an upload and a verify action per missing object."""
        self._require_token()
        payload = json.loads(self._body())
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "the local hub serves LFS uploads with the basic transfer only")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            answer = {"oid": oid, "size": size, "authenticated": True}
            if not self.hub.store.has_lfs_object(repo_id, oid, size):
                answer["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{repo_id}/{oid}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/lfs-verify/{repo_id}", "header": {}},
                }
            objects.append(answer)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, repo_id: str, oid: str) -> None:
        """The storage URL the batch answer points to (S3 on the real Hub: no Hub token there)."""
        self.hub.store.put_lfs_object(repo_id, oid, self._body())
        self.hub.lfs_uploads.append((repo_id, oid))
        self._send(200, b"")

    def _lfs_verify(self, repo_id: str) -> None:
        self._require_token()
        payload = json.loads(self._body())
        if not self.hub.store.has_lfs_object(repo_id, payload["oid"], int(payload["size"])):
            raise HubError(404, f"LFS object {payload['oid']} ({payload['size']} bytes) was not uploaded")
        self._json({"success": True})

    def _commit(self, repo_id: str, revision: str) -> None:
        self._require_token()
        if self.query.get("create_pr"):
            raise HubError(400, "pull requests are not supported by the local hub")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header, files, deletions = lines[0]["value"], {}, []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file" and value.get("encoding") == "base64":
                data = base64.b64decode(value["content"])
                if is_lfs(value["path"], len(data)):
                    raise HubError(400, f"{value['path']} is tracked by LFS (.gitattributes): upload it through the "
                                        "LFS batch API, not as a regular file")
                files[value["path"]] = data
            elif key == "lfsFile" and value.get("algo") == "sha256":
                if not self.hub.store.has_lfs_object(repo_id, value["oid"]):
                    raise HubError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = self.hub.store.lfs_object(repo_id, value["oid"]).read_bytes()
            elif key == "deletedFile":
                deletions.append(value["path"])
            elif key == "deletedFolder":
                deletions.append(value["path"].rstrip("/") + "/")
            else:
                raise HubError(400, f"unsupported commit operation {key!r} (the local hub takes file, lfsFile, "
                                    "deletedFile and deletedFolder)")
        sha = self.hub.store.commit(repo_id, files, header.get("summary", ""), branch=revision,
                                    deletions=tuple(deletions), parent=header.get("parentCommit"), create=False)
        self._json({"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                    "pullRequestUrl": None, "success": True})
