"""A fake Hugging Face Hub on loopback, for driving the real ``huggingface_hub`` client in tests.

It owns the few endpoints that ``HfApi`` (huggingface_hub 0.36.2) calls for whoami, create_repo,
repo_exists / model_info, list_repo_files (the tree API), create_branch and create_commit, and the
state they leave behind, kept in memory so tests can assert on exactly what arrived:

    with FakeHub() as hub, client_uses(hub, monkeypatch):   # or: the fake_hub fixture (conftest.py)
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        api.create_repo("tester/m", private=True)
        api.create_commit("tester/m", operations=[...], commit_message="Add")
        hub.files("tester/m")            # {path: bytes} on main
        hub.repos["tester/m"].commits    # [Commit(revision, message, description, added, deleted, create_pr, oid)]

Behaviour, modelled on the Hub's replies as the client reads them (huggingface_hub/hf_api.py,
_commit_api.py, lfs.py, utils/_http.py):

- Every request needs ``Authorization: Bearer <hub.token>``, else 401; the one exception is the
  PUT of an LFS object, which like the Hub's presigned storage URL carries a signature instead.
- The user ``tester`` may write to the namespaces ``tester`` and ``org``; other namespaces get 403.
- Unknown repos answer 404 with ``X-Error-Code: RepoNotFound``, unknown revisions ``RevisionNotFound``,
  a missing file to delete ``EntryNotFound``: the client turns them into its typed errors.
- A new repo holds a ``.gitattributes`` on ``main`` (its initial commit, not in ``Repo.commits``), as on the Hub.
- Preupload says "lfs" for files above ``hub.lfs_threshold`` bytes (1 MiB) or named ``*.safetensors``,
  ``*.onnx``, ``*.onnx_data``; set ``hub.lfs_threshold = 0`` to send every non-empty file through LFS.
- The LFS batch reply names the "basic" transfer. huggingface_hub 0.36.2 uploads through Xet only when
  that reply says ``"transfer": "xet"`` (``_commit_api._upload_files``); 1.x and later upload through Xet
  whenever hf_xet is installed, without asking, and this server does not speak Xet's storage protocol:
  ``client_uses`` sets HF_HUB_DISABLE_XET for the test, which sends every version down the LFS path.
- ``create_pr=True`` lands the commit on a new ``refs/pr/N`` and leaves the base branch as it was.

What the client side needs: huggingface_hub must be online (the suite sets HF_HUB_OFFLINE=1) and should
have the server as its endpoint; both are read at import, so ``client_uses(hub, monkeypatch)`` patches
``huggingface_hub.constants`` for one test (see there). The ``fake_hub`` fixture in conftest.py does it all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".onnx", ".onnx_data")
# The Hub's default for a new model repo, shortened to the patterns this project writes.
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.onnx filter=lfs diff=lfs merge=lfs -text\n" + (
    b"*.onnx_data filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)


@dataclass
class Commit:
    revision: str  # the ref the commit landed on: "main", a branch, or "refs/pr/N"
    message: str
    description: str
    added: dict[str, bytes]
    deleted: list[str]
    create_pr: bool
    oid: str = ""


@dataclass
class Repo:
    private: bool
    refs: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {".gitattributes": GITATTRIBUTES}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": secrets.token_hex(20)})  # ref -> commit oid
    commits: list[Commit] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"))


class HubError(Exception):
    """An error reply: status, message, and the X-Error-Code the client maps to an exception type."""

    def __init__(self, status: int, message: str, code: str | None = None, **body):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


def git_hash(data: bytes) -> str:
    """The git blob oid, what the Hub reports for a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@contextmanager
def client_uses(hub: FakeHub, monkeypatch):
    """Point huggingface_hub at ``hub`` inside this block, as ``HF_ENDPOINT=<hub> HF_HUB_OFFLINE=0`` would have.

    huggingface_hub reads both variables once, at import, into ``huggingface_hub.constants`` (and the
    module-level ``api`` behind ``huggingface_hub.create_repo`` & co. keeps the endpoint of that moment),
    so setting the variables in a test does nothing: the constants are patched with ``monkeypatch``.
    - HF_HUB_OFFLINE: conftest.py sets it, and an offline client refuses every request. The per-thread
      HTTP sessions are built from it and cached, so they are dropped on the way in and on the way out
      (they are built lazily: the next ones see the value monkeypatch restores at teardown).
    - HF_ENDPOINT: with any other endpoint the client cannot parse the URL it builds itself when a commit
      turns out empty: create_commit then builds ``CommitInfo(commit_url=f"{endpoint}/{repo}/commit/{sha}")``,
      whose RepoUrl parses it against ``constants.ENDPOINT`` and raises ValueError. Patched, it also keeps
      any client call made without ``endpoint=`` (``HfApi()``, ``huggingface_hub.create_repo``) on loopback.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub import utils as hub_utils

    # huggingface_hub < 1 keeps per-thread requests sessions (reset_sessions); 1.x+ one shared httpx
    # client (close_session): either is rebuilt on next use, from the patched constants and variables.
    reset_sessions = getattr(hub_utils, "reset_sessions", None) or hub_utils.close_session

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # LFS only (see the module docstring)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
    # requests honours proxy variables per request, httpx when its client is built (after the reset below):
    # the loopback traffic (and its token) must not go to a proxy.
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    reset_sessions()
    try:
        yield hub
    finally:
        reset_sessions()


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"


class FakeHub:
    """The fake Hub: state, endpoint, and the HTTP server (started by ``start()`` or ``with``)."""

    def __init__(self, token: str = "hf_fake_test_token", user: str = "tester", orgs: tuple[str, ...] = ("org",)):
        self.token = token
        self.user = user
        self.orgs = orgs
        self.lfs_threshold = 1024 * 1024
        self.tree_page_size = 1000  # entries per tree page; lower it to make the client follow Link headers
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 hex -> content, shared by all repos like a dedup store
        self.requests: list[tuple[str, str]] = []  # (method, path without query), in arrival order
        self.authorization: set[str] = set()  # every Authorization header value seen
        self._lock = threading.Lock()
        self._upload_key = secrets.token_bytes(16)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        # The Hub writes its public address into the URLs it returns, whatever address was called; the client
        # rewrites some (RepoUrl) to its endpoint and keeps others (CommitInfo.commit_url, pr_url) as they are.
        self.public_url = "https://huggingface.co"
        self._thread: threading.Thread | None = None
        self._routes = [
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("GET", rf"/api/models/{_REPO}", self._model_info),
            ("GET", rf"/api/models/{_REPO}/revision/{_REV}", self._model_info),
            ("GET", rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<subpath>.+))?", self._tree),
            ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", self._create_branch),
            ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", self._preupload),
            ("POST", rf"/api/models/{_REPO}/commit/{_REV}", self._commit),
            ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("POST", rf"/{_REPO}\.git/info/lfs/objects/verify", self._lfs_verify),
            ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", self._lfs_put),
        ]

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        # A short poll interval: shutdown() waits for the serving loop's next poll.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- helpers for tests -----------------------------------------------------------------------

    def files(self, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``ref`` (a branch or "refs/pr/N"), path -> content."""
        return dict(self.repos[repo_id].refs[ref])

    def add_repo(self, repo_id: str, *, private: bool = False, files: dict[str, bytes] | None = None) -> Repo:
        """Seed a repo, in any namespace, without going through the API."""
        repo = self.repos[repo_id] = Repo(private=private)
        repo.refs["main"].update(files or {})
        return repo

    def is_lfs(self, path: str, size: int) -> bool:
        return size > self.lfs_threshold or path.endswith(LFS_SUFFIXES)

    # --- dispatch --------------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers, body: bytes) -> tuple[int, dict, bytes]:
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self._lock:
            self.requests.append((method, url.path))
            authorization = headers.get("Authorization")
            if authorization is not None:
                self.authorization.add(authorization)
            try:
                for route_method, pattern, handler in self._routes:
                    match = re.fullmatch(pattern, url.path)
                    if route_method == method and match:
                        # The signed LFS PUT carries no token, like the Hub's presigned storage URLs.
                        if handler != self._lfs_put:
                            self._authenticate(authorization)
                        args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                        return handler(body=body, query=query, url_path=url.path, **args)
                raise HubError(404, f"Not found: {method} {url.path}")
            except HubError as e:
                extra = {"X-Error-Message": e.message} | ({"X-Error-Code": e.code} if e.code else {})
                return _json(e.status, {"error": e.message} | e.body, extra)

    def _authenticate(self, authorization: str | None) -> None:
        if authorization is None:
            raise HubError(401, "Unauthorized")
        if authorization != f"Bearer {self.token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return self.repos[repo_id]

    def _writable(self, repo_id: str) -> Repo:
        repo = self._repo(repo_id)
        if repo_id.split("/")[0] not in (self.user, *self.orgs):
            raise HubError(403, f"You don't have write access to {repo_id}")
        return repo

    @staticmethod
    def _ref(repo: Repo, rev: str) -> str:
        """The ref named by ``rev``: a ref name, or the commit oid at a ref's head."""
        if rev in repo.refs:
            return rev
        for ref, head in repo.heads.items():
            if head == rev:
                return ref
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    # --- endpoints -------------------------------------------------------------------------------

    def _whoami(self, **_):
        orgs = [{"type": "org", "name": name, "fullname": name.title(), "roleInOrg": "write", "isEnterprise": False} for name in self.orgs]
        token_info = {"displayName": "fake", "role": "write", "createdAt": "2024-01-01T00:00:00.000Z"}
        me = {"type": "user", "id": "0" * 24, "name": self.user, "fullname": self.user.title(), "isPro": False, "orgs": orgs}
        return _json(200, me | {"auth": {"type": "access_token", "accessToken": token_info}})

    def _create_repo(self, body, **_):
        request = json.loads(body)
        namespace = request.get("organization") or self.user
        repo_id = f"{namespace}/{request['name']}"
        if request.get("type", "model") != "model":
            raise HubError(400, "This fake Hub only holds model repos")
        if namespace not in (self.user, *self.orgs):
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        if repo_id in self.repos:
            # The client reads "url" from this reply too when exist_ok absorbs the 409.
            raise HubError(409, "You already created this model repo", url=f"{self.public_url}/{repo_id}")
        # huggingface_hub < 1 sends "private": bool, later versions "visibility": "private" | "public".
        private = request["visibility"] == "private" if "visibility" in request else bool(request.get("private", False))
        self.repos[repo_id] = Repo(private=private)
        return _json(200, {"url": f"{self.public_url}/{repo_id}", "name": repo_id, "id": secrets.token_hex(12)})

    def _validate_yaml(self, body, **_):
        # create_commit checks a README.md's metadata block here before uploading anything.
        content = json.loads(body)["content"]
        found = re.match(r"^---\n(.*?)\n---", content, flags=re.DOTALL)
        try:
            metadata = yaml.safe_load(found[1]) if found else {}
        except yaml.YAMLError as e:
            return _json(400, {"errors": [{"message": f"Invalid YAML: {e}"}], "warnings": []})
        if metadata is not None and not isinstance(metadata, dict):
            return _json(400, {"errors": [{"message": "Metadata must be a mapping"}], "warnings": []})
        return _json(200, {"errors": [], "warnings": []})

    def _model_info(self, repo, rev="main", **_):
        state = self._repo(repo)
        ref = self._ref(state, rev)
        files = state.refs[ref]
        info = {"_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo, "author": repo.split("/")[0]}
        info |= {"sha": state.heads[ref], "private": state.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0}
        info |= {
            "lastModified": state.created,
            "createdAt": state.created,
            "tags": [],
            "siblings": [{"rfilename": p} for p in sorted(files)],
        }
        return _json(200, info)

    def _tree(self, repo, rev, query, url_path, subpath="", **_):
        state = self._repo(repo)
        files = state.refs[self._ref(state, rev)]
        prefix = subpath.rstrip("/") + "/" if subpath else ""
        recursive = query.get("recursive", "False").lower() == "true"
        entries: dict[str, dict] = {}
        for name, data in files.items():
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            # Every folder between the prefix and the file, or only the first one when not recursive.
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folder = prefix + "/".join(parts[:depth])
                entries[folder] = {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder}
            if recursive or len(parts) == 1:
                entries[name] = {"type": "file", "oid": git_hash(data), "size": len(data), "path": name}
                if self.is_lfs(name, len(data)):
                    entries[name]["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        if prefix and not entries:
            raise HubError(404, f"{prefix.rstrip('/')} does not exist", "EntryNotFound")
        listing = [entries[k] for k in sorted(entries)]
        cursor = int(query.get("cursor", 0))
        page, extra = listing[cursor : cursor + self.tree_page_size], {}
        if cursor + self.tree_page_size < len(listing):
            # Paginated like the Hub: a Link header the client follows (utils/_pagination.py).
            extra["Link"] = f'<{self.endpoint}{url_path}?{urlencode(query | {"cursor": cursor + self.tree_page_size})}>; rel="next"'
        return _json(200, page, extra)

    def _create_branch(self, repo, branch, body, **_):
        state = self._writable(repo)
        if branch.startswith("refs/"):
            raise HubError(400, f"Invalid reference for a branch: {branch}")
        if branch in state.refs:
            raise HubError(409, "Reference already exists")
        start = self._ref(state, (json.loads(body) if body else {}).get("startingPoint") or "main")
        state.refs[branch], state.heads[branch] = dict(state.refs[start]), state.heads[start]
        return _json(200, {})

    def _preupload(self, repo, rev, body, **_):
        state = self._writable(repo)
        files = state.refs[self._ref(state, rev)]
        answers = []
        for item in json.loads(body)["files"]:
            lfs = self.is_lfs(item["path"], item["size"])
            # The oid of the file already there lets the client drop unchanged files from the commit.
            remote = files.get(item["path"])
            oid = None if remote is None else hashlib.sha256(remote).hexdigest() if lfs else git_hash(remote)
            answers.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return _json(200, {"files": answers, "commitOid": state.heads[self._ref(state, rev)]})

    def _lfs_batch(self, repo, body, **_):
        self._writable(repo)
        request = json.loads(body)
        if request.get("operation") != "upload" or "basic" not in request.get("transfers", ["basic"]):
            raise HubError(400, "Only uploads with the basic transfer are supported")
        objects = []
        for item in request["objects"]:
            oid, size = item["oid"], item["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs_objects:  # objects already stored get no actions: the client skips them
                signature = hmac.new(self._upload_key, oid.encode(), "sha256").hexdigest()
                entry["actions"] = {
                    "upload": {"href": f"{self.endpoint}/_lfs/{oid}?sig={signature}"},
                    "verify": {"href": f"{self.endpoint}/{repo}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(entry)
        # Naming "basic" here is what keeps huggingface_hub off the Xet path (see the module docstring).
        return _json(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid, query, body, **_):
        expected = hmac.new(self._upload_key, oid.encode(), "sha256").hexdigest()
        if not hmac.compare_digest(query.get("sig", ""), expected):
            raise HubError(403, "Bad upload signature")
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"Content does not match its sha256 {oid}")
        self.lfs_objects[oid] = body
        return 200, {"ETag": f'"{oid}"'}, b""

    def _lfs_verify(self, repo, body, **_):
        self._writable(repo)
        request = json.loads(body)
        stored = self.lfs_objects.get(request["oid"])
        if stored is None or len(stored) != request["size"]:
            raise HubError(404, f"LFS object {request['oid']} of size {request['size']} was not uploaded")
        return _json(200, {"success": True})

    def _commit(self, repo, rev, body, query, **_):
        state = self._writable(repo)
        if rev not in state.refs:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and not state.heads[rev].startswith(parent):
            raise HubError(412, f"Parent commit {parent} is not the head of {rev}")
        files, added, deleted = dict(state.refs[rev]), {}, []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            name = value["path"]
            if key == "file":
                files[name] = added[name] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(422, f"LFS file {name} refers to object {value['oid']}, which was never uploaded")
                files[name] = added[name] = self.lfs_objects[value["oid"]]
            elif key in ("deletedFile", "deletedFolder"):
                gone = [p for p in files if (p.startswith(name.rstrip("/") + "/") if key == "deletedFolder" else p == name)]
                if not gone:
                    raise HubError(404, f"A file with this name doesn't exist: {name}", "EntryNotFound")
                for p in gone:
                    files.pop(p)
                    added.pop(p, None)
                deleted.extend(gone)
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        create_pr = query.get("create_pr") == "1"
        target = f"refs/pr/{1 + sum(ref.startswith('refs/pr/') for ref in state.refs)}" if create_pr else rev
        oid = secrets.token_hex(20)
        state.refs[target], state.heads[target] = files, oid
        state.commits.append(Commit(target, header["summary"], header.get("description", ""), added, deleted, create_pr, oid))
        reply = {"success": True, "commitOid": oid, "commitUrl": f"{self.public_url}/{repo}/commit/{oid}", "hookOutput": ""}
        if create_pr:
            reply["pullRequestUrl"] = f"{self.public_url}/{repo}/discussions/{target.rsplit('/', 1)[1]}"
        return _json(200, reply)


def _json(status: int, payload, headers: dict | None = None) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"} | (headers or {}), json.dumps(payload).encode()


class _Handler(BaseHTTPRequestHandler):
    def _serve(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, headers, payload = self.server.hub.handle(self.command, self.path, self.headers, body)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _serve

    def log_message(self, format, *args) -> None:
        pass  # quiet: the test output is for the tests, and request lines are kept in hub.requests
