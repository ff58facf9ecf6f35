"""A local stand-in for the Hugging Face Hub: the HTTP endpoints `huggingface_hub` calls to push and pull a model.

Standard library only (`http.server`, threads); YAML metadata is checked with PyYAML, which `huggingface_hub` itself
requires. It serves, on 127.0.0.1:

- `POST /api/repos/create`                                   create a model repo (initial commit: `.gitattributes`)
- `POST /api/validate-yaml`                                  the README metadata check before a commit
- `POST /api/models/{repo}/preupload/{rev}`                  upload mode per file: "lfs" by `.gitattributes` or size
- `POST /{repo}.git/info/lfs/objects/batch`                  LFS batch API, "basic" transfer only
- `PUT  /lfs/objects/{oid}`, `POST /lfs/verify`              the basic-transfer upload and its verify step
- `POST /api/models/{repo}/commit/{rev}`                     NDJSON commit: header, file (base64), lfsFile, deletions
- `HEAD|GET /{repo}/resolve/{rev}/{path}`                    download, with X-Repo-Commit, ETag / X-Linked-Etag, sizes
- `GET  /api/models/{repo}[/revision/{rev}]`                 repo info (sha, siblings)
- `GET  /api/models/{repo}/tree/{rev}[/{path}]`              tree listing
- `GET  /api/agent-harnesses`                                the client's (empty) agent registry for its user agent

Writes need a bearer token; reads do not. Requests it does not implement answer 404 and are recorded in
`unhandled`, so a test can assert that the client used nothing else. Xet is not offered: with `hf_xet` installed,
`huggingface_hub` uploads LFS files through Xet unless `HF_HUB_DISABLE_XET=1`, which clients of this server must set.
The server stops by itself after `lifetime_s`.
"""

import base64
import fnmatch
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.pkl", "*.npy",
                "*.npz", "*.zip", "*.tar.*", "*.gz", "*.model", "*.tflite", "*.ot")
LFS_SIZE_LIMIT = 10 * 1024 * 1024  # the Hub stores larger files in LFS whatever their name
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Blob:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def oid(self) -> str:
        """What the Hub reports as a file's oid: sha256 of an LFS file, git blob sha1 of a regular one."""
        return self.sha256 if self.lfs else git_blob_sha1(self.content)


@dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def at(self, revision: str) -> Commit | None:
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.sha == revision), None)

    def commit(self, message: str, files: dict[str, Blob]) -> Commit:
        parent = self.commits[-1].sha if self.commits else ""
        listing = "".join(f"{path}:{blob.oid}\n" for path, blob in sorted(files.items()))
        sha = hashlib.sha1(f"{parent}\n{message}\n{listing}\n{time.time_ns()}".encode()).hexdigest()
        self.commits.append(Commit(sha, message, files))
        return self.head


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **body):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.body = status, message, code, headers or {}, body


class FakeHub:
    """The Hub state (repos, LFS objects) and the HTTP server serving it; `url` is the value for HF_ENDPOINT."""

    def __init__(self, lifetime_s: float = 600.0, user: str = "user"):
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.unhandled: list[str] = []
        self.user = user
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)
        self._deadline = threading.Timer(lifetime_s, self.stop)
        self._deadline.daemon = True

    def start(self) -> "FakeHub":
        self._thread.start()
        self._deadline.start()
        return self

    def stop(self) -> None:
        self._deadline.cancel()
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The content of every file of a repo at a revision."""
        with self.lock:
            commit = self._repo(repo_id).at(revision)
            return {path: blob.content for path, blob in commit.files.items()}

    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit_at(self, repo_id: str, revision: str) -> tuple[Repo, Commit]:
        repo = self._repo(repo_id)
        commit = repo.at(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo, commit

    # Endpoints: each takes the request and its route's match and returns (status, headers, body).

    def create_repo(self, request, match):
        payload = request.json()
        if payload.get("type", "model") != "model":
            raise HubError(400, "this fake Hub serves model repos only")
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        repo = Repo(repo_id, private=payload.get("visibility") == "private")
        repo.commit("initial commit", {".gitattributes": Blob(GITATTRIBUTES, lfs=False)})
        self.repos[repo_id] = repo
        return 200, {}, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def validate_yaml(self, request, match):
        content = request.json()["content"]
        block = re.match(r"^\s*---\r?\n([\s\S]*?)\r?\n---", content)
        try:
            metadata = yaml.safe_load(block.group(1)) if block else {}
        except yaml.YAMLError as error:
            return 400, {}, {"errors": [{"message": f"invalid YAML: {error}"}], "warnings": []}
        if not isinstance(metadata, (dict, type(None))):
            return 400, {}, {"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []}
        return 200, {}, {"errors": [], "warnings": []}

    def preupload(self, request, match):
        _, commit = self._commit_at(match["repo"], match["rev"])
        gitattributes = commit.files.get(".gitattributes", Blob(b"", lfs=False)).content.decode()
        patterns = [line.split()[0] for line in gitattributes.splitlines() if "filter=lfs" in line]
        files = []
        for item in request.json()["files"]:
            path = item["path"]
            lfs = item["size"] > LFS_SIZE_LIMIT or any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in patterns)
            existing = commit.files.get(path)
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": existing.oid if existing else None})
        return 200, {}, {"files": files, "commitOid": commit.sha}

    def lfs_batch(self, request, match):
        self._repo(match["repo"])
        payload = request.json()
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "this fake Hub takes LFS uploads with the basic transfer only")
        objects = []
        for item in payload["objects"]:
            entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs/objects/{item['oid']}", "header": {}},
                    "verify": {"href": f"{self.url}/lfs/verify", "header": {}},
                }
            objects.append(entry)
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, {"transfer": "basic", "objects": objects}

    def lfs_put(self, request, match):
        content = request.body
        if hashlib.sha256(content).hexdigest() != match["oid"]:
            raise HubError(400, "LFS object content does not match its sha256")
        self.lfs_objects[match["oid"]] = content
        return 200, {}, b""

    def lfs_verify(self, request, match):
        payload = request.json()
        content = self.lfs_objects.get(payload["oid"])
        if content is None or len(content) != payload["size"]:
            raise HubError(422, f"LFS object {payload['oid']} missing or of the wrong size")
        return 200, {}, {}

    def commit(self, request, match):
        if request.query.get("create_pr"):
            raise HubError(400, "this fake Hub does not open pull requests")
        repo, head = self._commit_at(match["repo"], match["rev"])
        if head is not repo.head:
            raise HubError(400, "commits go to the head of main only")
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "a commit starts with its header line")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, head.sha):
            raise HubError(412, "parent commit is not the head")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                content = self.lfs_objects.get(value["oid"])
                if content is None:
                    raise HubError(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = Blob(content, lfs=True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        commit = repo.commit(header["summary"], files)
        return 200, {}, {"commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.sha}", "commitOid": commit.sha,
                         "pullRequestUrl": None}

    def resolve(self, request, match):
        _, commit = self._commit_at(match["repo"], match["rev"])
        path = unquote(match["path"])
        headers = {"X-Repo-Commit": commit.sha}
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        headers.update({"ETag": f'"{git_blob_sha1(blob.content)}"', "Content-Type": "application/octet-stream"})
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.content))})
        return 200, headers, blob.content

    def repo_info(self, request, match):
        repo, commit = self._commit_at(match["repo"], match["rev"] or "main")
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        return 200, {}, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.sha, "private": repo.private,
                         "disabled": False, "gated": False, "tags": [], "siblings": siblings}

    def tree(self, request, match):
        _, commit = self._commit_at(match["repo"], match["rev"])
        folder = unquote(match["path"] or "").strip("/")
        prefix = f"{folder}/" if folder else ""
        recursive = request.query.get("recursive", "false").lower() in ("1", "true")
        entries, folders = [], set()
        for path, blob in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            for depth in range(rest.count("/")):
                folders.add(prefix + "/".join(rest.split("/")[: depth + 1]))
            entry = {"type": "file", "path": path, "size": len(blob.content), "oid": git_blob_sha1(blob.content)}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.content), "pointerSize": 134}
            entries.append(entry)
        if folder and not entries and not folders:
            raise HubError(404, f"Entry not found: {folder}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        entries += [{"type": "directory", "path": path, "size": 0, "oid": "0" * 40} for path in sorted(folders)]
        return 200, {}, entries

    def agent_harnesses(self, request, match):
        return 200, {}, {"standardEnvVars": [], "harnesses": {}}

    ROUTES = [
        ("POST", r"/api/repos/create", "create_repo", True),
        ("POST", r"/api/validate-yaml", "validate_yaml", False),
        ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload", True),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch", True),
        ("PUT", r"/lfs/objects/(?P<oid>[0-9a-f]{64})", "lfs_put", False),
        ("POST", r"/lfs/verify", "lfs_verify", True),
        ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit", True),
        ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve", False),
        ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve", False),
        ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info", False),
        ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree", False),
        ("GET", r"/api/agent-harnesses", "agent_harnesses", False),
    ]

    def handle(self, request) -> tuple[int, dict, object]:
        with self.lock:
            self.requests.append(f"{request.method} {request.path}")
            for method, pattern, endpoint, needs_token in self.ROUTES:
                match = re.fullmatch(pattern, request.path)
                if method == request.method and match:
                    if needs_token and not request.headers.get("Authorization", "").startswith("Bearer "):
                        return 401, {"X-Error-Message": "Invalid credentials"}, {"error": "Invalid credentials"}
                    try:
                        return getattr(self, endpoint)(request, match)
                    except HubError as error:
                        headers = dict(error.headers, **{"X-Error-Message": error.message})
                        if error.code:
                            headers["X-Error-Code"] = error.code
                        return error.status, headers, {"error": error.message, **error.body}
            self.unhandled.append(f"{request.method} {request.path}")
            return 404, {"X-Error-Message": "not implemented by the fake Hub"}, {"error": "not implemented"}


class _Request:
    def __init__(self, handler: BaseHTTPRequestHandler):
        url = urlsplit(handler.path)
        self.method, self.path, self.headers = handler.command, url.path, handler.headers
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.body = _read_body(handler) if self.method in ("POST", "PUT") else b""

    def json(self):
        return json.loads(self.body or b"{}")


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                handler.rfile.readline()
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length", 0)))


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            status, headers, body = hub.handle(_Request(self))
            if not isinstance(body, bytes):
                body = json.dumps(body).encode()
                headers.setdefault("Content-Type", "application/json")
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_POST = do_PUT = _serve

        def log_message(self, format, *args):  # the hub records requests itself; keep test output clean
            pass

    return Handler
