"""A small in-memory Hugging Face Hub for tests: the endpoints the real `huggingface_hub` client calls.

Start it with `HubServer()` (a `ThreadingHTTPServer` on 127.0.0.1, free port, in a daemon thread) and point
the client at it with `HF_ENDPOINT=server.url` set before `huggingface_hub` is imported (tests do this by
running the scripts in a subprocess). Implemented, as `huggingface_hub` 1.x/2.x calls them:

  POST /api/repos/create                          create_repo (409 when it exists)
  POST /api/validate-yaml                         model-card metadata check before a commit with README.md
  POST /api/models/{repo}/preupload/{rev}         every file is "regular" (no LFS / Xet upload step)
  POST /api/models/{repo}/commit/{rev}            NDJSON body: header + base64 "file" + "deletedFile" lines
  GET  /api/models/{repo}[/revision/{rev}]        repo_info (sha, siblings)
  GET  /api/models/{repo}/tree/{rev}[/path]       list_repo_tree (what snapshot_download lists)
  HEAD/GET /{repo}/resolve/{rev}/{path}           hf_hub_download (X-Repo-Commit, ETag, Content-Length)
  GET  /api/whoami-v2                             whoami

Writes need `Authorization: Bearer <token>` with the token the server was started with; reads of a private
repo too. Every request is recorded in `server.requests` (method, path, whether it was authorised) so tests
can check what the client did without the server ever storing the token itself.
"""
import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


def _git_blob_oid(data: bytes) -> str:
    """The id git (and the Hub) gives a regular file: sha1 of 'blob <size>\\0' + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    def __init__(self, repo_id: str, private: bool):
        self.repo_id, self.private = repo_id, private
        self.commits: dict[str, dict[str, bytes]] = {}  # commit sha -> {path: content}
        self.head = self._commit({}, "initial commit")

    def _commit(self, files: dict, message: str) -> str:
        parent = getattr(self, "head", "")
        sha = hashlib.sha1(f"{self.repo_id}\n{parent}\n{message}\n{len(self.commits)}".encode()).hexdigest()
        self.commits[sha] = files
        self.head = sha
        return sha

    def files_at(self, rev: str) -> tuple[str, dict] | None:
        sha = self.head if rev == "main" else rev
        return (sha, self.commits[sha]) if sha in self.commits else None


class HubServer:
    def __init__(self, token: str = "hf_fake_secret_token", user: str = "tester"):
        self.user, self.repos, self.requests = user, {}, []
        self._auth = f"Bearer {token}"
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The files at the head of `repo_id` (what a download would return)."""
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.head])

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            # --- helpers
            def _authorised(self) -> bool:
                return self.headers.get("Authorization") == server._auth

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, payload=None, headers=None, body: bytes | None = None, head=False):
                if body is None:
                    body = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _error(self, status: int, code: str, message: str, head=False):
                self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head=head)

            def _repo(self, repo_id: str, head=False) -> "_Repo | None":
                repo = server.repos.get(repo_id)
                if repo is None or (repo.private and not self._authorised()):
                    self._error(404, "RepoNotFound", f"Repository not found: {repo_id}", head=head)
                    return None
                return repo

            def _record(self):
                server.requests.append(
                    {"method": self.command, "path": urlparse(self.path).path, "authorised": self._authorised()}
                )

            # --- routes
            def do_HEAD(self):
                self._record()
                self._resolve(head=True)

            def do_GET(self):
                self._record()
                path = unquote(urlparse(self.path).path)
                query = parse_qs(urlparse(self.path).query)
                if path == "/api/whoami-v2":
                    if not self._authorised():
                        return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                    return self._send(200, {"type": "user", "name": server.user, "orgs": [],
                                            "auth": {"type": "access_token",
                                                     "accessToken": {"displayName": "test", "role": "write"}}})
                if m := re.fullmatch(rf"/api/models/{REPO}(/revision/(?P<rev>[^/]+))?", path):
                    return self._info(m["repo"], m["rev"] or "main")
                if m := re.fullmatch(rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(/(?P<sub>.*))?", path):
                    recursive = query.get("recursive", ["False"])[0].lower() == "true"
                    return self._tree(m["repo"], m["rev"], m["sub"] or "", recursive)
                self._resolve(head=False)

            def do_POST(self):
                self._record()
                path = unquote(urlparse(self.path).path)
                body = self._body()
                if path == "/api/validate-yaml":
                    return self._validate_yaml(json.loads(body))
                if not self._authorised():
                    return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                if path == "/api/repos/create":
                    return self._create(json.loads(body))
                if m := re.fullmatch(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", path):
                    return self._preupload(m["repo"], m["rev"], json.loads(body))
                if m := re.fullmatch(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", path):
                    return self._commit(m["repo"], m["rev"], body)
                self._error(404, "EntryNotFound", f"no such endpoint: POST {path}")

            # --- endpoint bodies
            def _validate_yaml(self, payload):
                text = payload.get("content", "")
                m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
                try:
                    meta = yaml.safe_load(m[1]) if m else None
                except yaml.YAMLError as e:
                    return self._send(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
                if m and not isinstance(meta, dict):
                    return self._send(400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
                self._send(200, {"errors": [], "warnings": []})

            def _create(self, payload):
                repo_type = payload.get("type", "model")
                if repo_type != "model":
                    return self._error(400, "BadRequest", "this test server only hosts model repos")
                repo_id = f"{payload.get('organization') or server.user}/{payload['name']}"
                with server._lock:
                    if repo_id in server.repos:  # the client reads "url" from the 409 body too (exist_ok=True)
                        return self._send(409, {"error": "You already created this model repo",
                                                "url": f"{server.url}/{repo_id}"})
                    private = payload.get("private") or payload.get("visibility") == "private"
                    server.repos[repo_id] = _Repo(repo_id, bool(private))
                self._send(200, {"url": f"{server.url}/{repo_id}", "name": repo_id})

            def _preupload(self, repo_id, rev, payload):
                if (repo := self._repo(repo_id)) is None:
                    return
                _, files = repo.files_at(rev) or (None, {})
                self._send(200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": _git_blob_oid(files[f["path"]]) if f["path"] in files else None}
                    for f in payload["files"]]})

            def _commit(self, repo_id, rev, body):
                if (repo := self._repo(repo_id)) is None:
                    return
                if self.headers.get("Content-Type") != "application/x-ndjson":
                    return self._error(400, "BadRequest", "commit body must be application/x-ndjson")
                with server._lock:
                    found = repo.files_at(rev)
                    if found is None:
                        return self._error(404, "RevisionNotFound", f"Revision not found: {rev}")
                    files, summary = dict(found[1]), ""
                    for line in body.splitlines():
                        item = json.loads(line)
                        key, value = item["key"], item["value"]
                        if key == "header":
                            summary = value["summary"]
                        elif key == "file":
                            if value.get("encoding") != "base64":
                                return self._error(400, "BadRequest", "file content must be base64")
                            files[value["path"]] = base64.b64decode(value["content"])
                        elif key == "deletedFile":
                            files.pop(value["path"], None)
                        elif key == "deletedFolder":
                            folder = value["path"].rstrip("/") + "/"
                            files = {p: c for p, c in files.items() if not p.startswith(folder)}
                        else:  # lfsFile / copies are never requested: preupload answers "regular" only
                            return self._error(400, "BadRequest", f"unsupported commit operation {key!r}")
                    sha = repo._commit(files, summary)
                self._send(200, {"commitUrl": f"{server.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                                 "pullRequestUrl": None})

            def _info(self, repo_id, rev):
                if (repo := self._repo(repo_id)) is None:
                    return
                if (found := repo.files_at(rev)) is None:
                    return self._error(404, "RevisionNotFound", f"Revision not found: {rev}")
                sha, files = found
                self._send(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                                 "siblings": [{"rfilename": p} for p in sorted(files)]})

            def _tree(self, repo_id, rev, sub, recursive):
                if (repo := self._repo(repo_id)) is None:
                    return
                if (found := repo.files_at(rev)) is None:
                    return self._error(404, "RevisionNotFound", f"Revision not found: {rev}")
                prefix = sub.rstrip("/") + "/" if sub else ""
                entries, folders = [], set()
                for path, data in sorted(found[1].items()):
                    if not path.startswith(prefix):
                        continue
                    rest = path[len(prefix):]
                    if "/" in rest and not recursive:
                        folders.add(prefix + rest.split("/")[0])
                        continue
                    if recursive:  # the Hub lists every parent folder of a file in a recursive listing
                        parts = rest.split("/")[:-1]
                        folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
                    entries.append({"type": "file", "path": path, "size": len(data), "oid": _git_blob_oid(data)})
                entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()}
                            for f in sorted(folders)]
                self._send(200, entries)

            def _resolve(self, head):
                path = unquote(urlparse(self.path).path)
                m = re.fullmatch(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
                if m is None:
                    return self._error(404, "EntryNotFound", f"no such endpoint: {path}", head=head)
                if (repo := self._repo(m["repo"], head=head)) is None:
                    return
                if (found := repo.files_at(m["rev"])) is None:
                    return self._error(404, "RevisionNotFound", f"Revision not found: {m['rev']}", head=head)
                sha, files = found
                if m["file"] not in files:
                    return self._send(404, {"error": "Entry not found"},
                                      {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, head=head)
                data = files[m["file"]]
                self._send(200, body=data, head=head, headers={
                    "Content-Type": "application/octet-stream", "X-Repo-Commit": sha,
                    "ETag": f'"{_git_blob_oid(data)}"'})

        return Handler
