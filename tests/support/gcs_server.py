"""A real Cloud Storage API server on loopback for the tests: gcp-storage-emulator behind a TLS proxy.

What runs
---------
``GcsServer.start()`` makes a throw-away certificate authority with ``openssl`` (a CA and one leaf
certificate whose subjectAltName covers the Google hosts TensorFlow contacts), then starts THIS file as a
subprocess (``python gcs_server.py --serve ...``). That process serves, on one free 127.0.0.1 port:

* plain HTTP, the Cloud Storage JSON API of ``gcp-storage-emulator`` (in memory): tensorstore (orbax's
  array writer) and google-cloud-storage talk to it directly;
* ``CONNECT`` for TensorFlow, which has no endpoint override for gs:// but whose libcurl honours
  ``HTTPS_PROXY`` and ``CURL_CA_BUNDLE``: a CONNECT to one of ``SERVED_HOSTS`` on port 443 is answered
  200, TLS is ended there with the leaf certificate, and the decrypted HTTP requests go to the same
  emulator routes (with ``https://<host>`` as the base of the URLs it hands out, so resumable-upload
  sessions come back through the proxy). Any other CONNECT target, and any absolute-form (plain proxy)
  request, is refused with 403 and recorded: ``GcsServer.log()["refused"]``;
* a fake GCE metadata server path (``/computeMetadata/...``, always 404, every hit recorded) and a fake
  ``https://oauth2.googleapis.com/token`` (a fixed test token), so nothing that looks for credentials
  leaves loopback either.

URL paths TensorFlow 2.21 uses (seen in ``log()["requests"]``): ``www.googleapis.com`` for the JSON API
(``/storage/v1/b/<b>``, ``/storage/v1/b/<b>/o?prefix=..&delimiter=/``, ``/storage/v1/b/<b>/o/<o>``,
``.../rewriteTo/...`` for rename, DELETE) and uploads (``POST /upload/storage/v1/b/<b>/o?uploadType=resumable``
then ``PUT`` of the session URL); ``storage.googleapis.com/<b>/<o>`` with a Range header for media reads.
The emulator routes all of these (the last one is its "public URL" route).

Lifetime: one server per test session (the ``gcs_server`` fixture in conftest.py) and a fresh bucket per
test (``gcs_bucket``). The server process exits when ``stop()`` is called, when the process that started
it dies (it polls its parent), or after ``lifetime_s`` (default 2 h; ``ADAFACE_GCS_SERVER_LIFETIME_S``)
whatever happens, so a killed test run leaves nothing behind. Its temp dir (certificates, its log) is
removed by ``stop()``, or by the server itself when it outlives its parent.

Emulator bugs (gcp-storage-emulator 2026.7.19) fixed in the server process by patching its handlers:

1. ``Content-Length`` was trusted over ``Transfer-Encoding: chunked`` (TF's uploads were stored with the
   chunk framing): the body is read here, chunked framing first, before the emulator sees it.
2. A zero-byte media/XML upload crashed it (``len(None)``): an empty upload body is ``b""``.
3. Listing ignored ``startOffset``/``endOffset`` (tensorstore's ranged list then returns keys outside the
   range; a colleague saw it abort the process): the list answer is filtered to the range.
4. Media downloads carried no ``x-goog-generation`` and ignored ``ifGenerationMatch`` /
   ``ifGenerationNotMatch`` (tensorstore's conditional OCDBT manifest reads failed intermittently with
   "Malformed StorageGeneration"): downloads are answered here with the ``x-goog-generation``,
   ``x-goog-metageneration``, ``x-goog-stored-content-length`` and ``x-goog-hash`` headers, 304 when
   ``ifGenerationNotMatch`` equals the current generation and 412 when ``ifGenerationMatch`` does not
   (also ``ifMetageneration[Not]Match``); the same preconditions are checked on uploads (0 = "must not
   exist"), metadata reads, patches, deletes and the destination of copies.

Also changed: objects are stored under a flat, quoted key (names like ``dir/`` and ``dir`` no longer
collide in the emulator's file store, ``..`` in a name no longer raises), nothing is persisted to a
``.meta`` file (in-memory run), deletes are hard deletes (no 7-day soft-delete copies pile up in memory),
the server is threaded with one lock around the emulator, speaks HTTP/1.1 (``Expect: 100-continue`` is
answered at once; an HTTP/1.0 server makes libcurl wait 1 s per upload), handles single-range requests
of every form (``a-b``, ``a-``, ``-n``; 416 past the end), and answers 500 rather than dropping the
connection when a handler raises (recorded in ``log()["errors"]``).

Environment: ``GcsServer.env`` is what a CHILD process needs (``subprocess.run(..., env={**os.environ,
**server.env})``); the ``gcs_server`` fixture also sets it into ``os.environ`` for the in-process clients.
Each variable and why:

* ``HTTPS_PROXY``/``https_proxy``: TF's libcurl sends its https:// requests to Google through the proxy
  (curl reads the lowercase one first, so both are set). ``HTTP_PROXY``/``http_proxy``/``ALL_PROXY``/
  ``all_proxy``: any plain-http request to a non-loopback host lands here too, where it is refused and
  recorded instead of leaving the machine.
* ``NO_PROXY``/``no_proxy`` = ``127.0.0.1,localhost,::1``: loopback (tensorstore, google-cloud-storage,
  the fixtures' own calls) goes direct; an inherited ``no_proxy`` naming googleapis.com is overridden.
* ``CURL_CA_BUNDLE``: the throw-away CA; TF reads it for every request (CURLOPT_CAINFO).
* ``NO_GCE_CHECK=true``: TF and google-auth never probe for a GCE metadata server.
* ``GCE_METADATA_HOST``, ``GCE_METADATA_IP``, ``GCE_METADATA_ROOT`` = ``127.0.0.1:<port>``: if anything
  still asks the metadata server (google-auth, TF's zone provider, tensorstore's GCE auth) it asks this
  server, which answers 404 without ``Metadata-Flavor: Google`` (= not on GCE) and records the hit.
* ``GOOGLE_AUTH_TOKEN_FOR_TESTING``: a fixed bearer token; both TF and tensorstore use it before any
  credentials file or metadata server.
* ``CLOUDSDK_CONFIG``: an empty dir, so no developer's gcloud application-default credentials are found.
* ``TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:<port>``: tensorstore's gcs driver endpoint.
* ``STORAGE_EMULATOR_HOST=http://127.0.0.1:<port>``: google-cloud-storage's endpoint (anonymous
  credentials); ``GOOGLE_CLOUD_PROJECT``: a project name for its Client.

What the clients cache (measured with TF 2.21 and tensorstore 0.1.86):

* TensorFlow: libcurl reads the proxy variables, and TF reads ``CURL_CA_BUNDLE`` and ``GCE_METADATA_HOST``,
  on every request, so setting the environment after ``import tensorflow`` and after TF's first local-file
  use works (the self-tests do exactly that). TF builds its GCS file system once per process and reads the
  ``GCS_*`` knobs then; its stat cache keeps a successful ``stat`` of an object for 5 s
  (``GCS_STAT_CACHE_MAX_AGE``) and is invalidated by TF's own writes and deletes, so only a change made by
  ANOTHER process (or client) to an object this process stat-ed in the last 5 s can be seen late. TF keeps
  the bearer token of ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` for the life of the process once it has read it;
  and a gs:// access made BEFORE the fixture set ``NO_GCE_CHECK`` would have tried the real metadata server
  (metadata.google.internal, off loopback) and then kept an empty token forever. Tokens are ignored by the
  emulator, so a kept token is harmless; the early access itself is what a test must not do.
* tensorstore reads ``TENSORSTORE_GCS_HTTP_URL`` when a gcs kvstore is opened (a changed value is honoured
  by the next open in the same process).
* google-cloud-storage reads ``STORAGE_EMULATOR_HOST`` when a ``Client`` is made.

A new server has a new port; nothing of the port is kept by the clients above beyond what they opened.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid

SERVED_HOSTS = ("storage.googleapis.com", "www.googleapis.com", "oauth2.googleapis.com")
TEST_TOKEN = "adaface-test-token"
SERVED_TARGETS = {f"{host}:443" for host in SERVED_HOSTS}
# Attempts to leave loopback that other tests of the session make, which the proxy refuses: onnxruntime's native
# library (libonnxruntime.so, imported by the export tests) sends telemetry there, at times, even after
# ort.disable_telemetry_events(). Open: stop it at its source, then empty this.
KNOWN_REFUSED = {"mobile.events.data.microsoft.com:443": "onnxruntime's telemetry"}
DEFAULT_LIFETIME_S = float(os.environ.get("ADAFACE_GCS_SERVER_LIFETIME_S", 2 * 3600))
_LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------------------------------
# The test side: start, stop, environment, buckets, log.
# --------------------------------------------------------------------------------------------------

def activity_between(before: dict, after: dict) -> dict:
    """What the server recorded between two ``GcsServer.log(requests=0)`` snapshots."""
    return {"connects": set(after["connects"]) - set(before["connects"]),
            **{key: after[key][len(before[key]):] for key in ("refused", "metadata", "errors")}}


def _direct_opener():
    """A urllib opener that never uses a proxy (the server's own env sets HTTP(S)_PROXY)."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=60)


def make_certificates(directory: str, hosts=SERVED_HOSTS) -> dict:
    """A throw-away CA and a leaf certificate for ``hosts`` (subjectAltName), EC P-256, valid 2 days."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=adaface-jax test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=directory)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "leaf.key",
             "-out", "leaf.csr", "-subj", f"/CN={hosts[0]}", cwd=directory)
    with open(os.path.join(directory, "leaf.ext"), "w") as f:
        f.write("subjectAltName=" + ",".join(f"DNS:{h}" for h in hosts) + "\n"
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext", cwd=directory)
    return {name: os.path.join(directory, name) for name in ("ca.pem", "leaf.pem", "leaf.key")}


class GcsServer:
    """The emulator + CONNECT/TLS proxy in a subprocess on a free 127.0.0.1 port (see the module docstring)."""

    def __init__(self, lifetime_s: float = DEFAULT_LIFETIME_S, startup_timeout_s: float = 60.0):
        self.lifetime_s = float(lifetime_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.port = None
        self.proc = None
        self.tmpdir = None
        self.env: dict = {}

    @property
    def url(self) -> str:
        return f"http://{_LOOPBACK}:{self.port}"

    # ---- lifecycle
    def start(self) -> "GcsServer":
        if self.proc is not None:
            raise RuntimeError("GcsServer already started")
        self.tmpdir = tempfile.mkdtemp(prefix="adaface-gcs-")
        try:
            certs = make_certificates(self.tmpdir)
            port_file = os.path.join(self.tmpdir, "port")
            gcloud = os.path.join(self.tmpdir, "gcloud")
            os.makedirs(gcloud)
            self._log_path = os.path.join(self.tmpdir, "server.log")
            child_env = {k: v for k, v in os.environ.items()
                         if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
            with open(self._log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--serve", "--port-file", port_file,
                     "--cert", certs["leaf.pem"], "--key", certs["leaf.key"], "--lifetime", str(self.lifetime_s),
                     "--parent-pid", str(os.getpid())],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env)
            deadline = time.monotonic() + self.startup_timeout_s
            while not os.path.exists(port_file):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"GCS server exited with {self.proc.returncode}: {self.server_log()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"GCS server did not start in {self.startup_timeout_s} s: {self.server_log()}")
                time.sleep(0.05)
            with open(port_file) as f:
                self.port = int(f.read())
            self._get("/")  # health check
            hostport = f"{_LOOPBACK}:{self.port}"
            self.env = {
                "HTTPS_PROXY": self.url, "https_proxy": self.url,
                "HTTP_PROXY": self.url, "http_proxy": self.url,
                "ALL_PROXY": self.url, "all_proxy": self.url,
                "NO_PROXY": "127.0.0.1,localhost,::1", "no_proxy": "127.0.0.1,localhost,::1",
                "CURL_CA_BUNDLE": certs["ca.pem"],
                "NO_GCE_CHECK": "true",
                "GCE_METADATA_HOST": hostport, "GCE_METADATA_IP": hostport, "GCE_METADATA_ROOT": hostport,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": TEST_TOKEN,
                "CLOUDSDK_CONFIG": gcloud,
                "TENSORSTORE_GCS_HTTP_URL": self.url,
                "STORAGE_EMULATOR_HOST": self.url,
                "GOOGLE_CLOUD_PROJECT": "adaface-test",
            }
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                self._post("/_test/shutdown", timeout=5)
            except OSError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def server_log(self) -> str:
        try:
            with open(self._log_path, "rb") as f:
                return f.read()[-4000:].decode("utf-8", "replace")
        except (OSError, AttributeError):
            return ""

    # ---- HTTP to the server itself (never through a proxy)
    def _request(self, method, path, body=None, timeout=30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with _direct_opener().open(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip().startswith(b"{") else raw

    def _get(self, path, timeout=30):
        return self._request("GET", path, timeout=timeout)

    def _post(self, path, body=None, timeout=30):
        return self._request("POST", path, body if body is not None else {}, timeout=timeout)

    # ---- buckets
    def make_bucket(self, name: str | None = None) -> str:
        """Create bucket ``name`` (a fresh ``b-<hex>`` when None) through the JSON API; returns its name."""
        name = name or f"b-{uuid.uuid4().hex[:12]}"
        self._post("/storage/v1/b?project=adaface-test", {"name": name})
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete bucket ``name`` and every object in it (frees the server's memory)."""
        self._request("DELETE", "/_test/buckets/" + urllib.parse.quote(name, safe=""))

    # ---- what the server saw
    def log(self, requests: int | None = None) -> dict:
        """What the server saw: ``{"connects": {target: count}, "refused": [{"kind", "method", "target"}...],
        "requests": [{"host", "method", "path", "status", "t" (s since start), "dt" (s to answer)}...] (the last
        20000), "requests_total": n,
        "metadata": [...] (GCE metadata hits), "errors": [...] (handler exceptions, TLS failures; not a client that
        hung up)}``;
        ``requests=N`` keeps only the last N requests."""
        return self._get("/_test/log" + ("" if requests is None else f"?requests={int(requests)}"))

    def connect_targets(self) -> set:
        """Every CONNECT target (``host:port``) the proxy has seen, served or refused."""
        return set(self.log(requests=0)["connects"])


# --------------------------------------------------------------------------------------------------
# The server side (only in the ``--serve`` subprocess).
# --------------------------------------------------------------------------------------------------

def _patch_emulator():
    """Fix gcp-storage-emulator 2026.7.19 for the clients the tests use; see the module docstring."""
    import re  # noqa: PLC0415
    from http import HTTPStatus  # noqa: PLC0415

    from gcp_storage_emulator import server as emu_server  # noqa: PLC0415
    from gcp_storage_emulator import storage as emu_storage  # noqa: PLC0415
    from gcp_storage_emulator.exceptions import NotFound  # noqa: PLC0415
    from gcp_storage_emulator.handlers import buckets, objects  # noqa: PLC0415

    # Bug 1: the body is read by our handler (chunked first) before routing.
    emu_server._read_raw_data = lambda handler: getattr(handler, "_body", b"")

    # https base URL for requests that came through the TLS tunnel; bug 2: empty upload bodies are b"".
    class Request(emu_server.Request):
        def __init__(self, handler, method):
            super().__init__(handler, method)
            scheme = getattr(handler, "scheme", "http")
            if scheme != "http":
                self._base_url = f"{scheme}://{handler.tunnel_host}"  # not the Host header: stay on served hosts
                self._full_url = self._base_url + self._path
                self._parsed_url = urllib.parse.urlparse(self._full_url)
                self._query = urllib.parse.parse_qs(self._parsed_url.query)

        @property
        def data(self):
            data = super().data
            if data is None and self.method in ("PUT", "POST"):
                ctype = self.get_header("Content-Type") or ""
                if not ctype.startswith("application/json"):
                    self._data = data = b""
            return data

    emu_server.Request = Request

    # Flat storage keys; no .meta persistence; hard deletes.
    emu_storage.Storage._object_path = lambda self, bucket, name: f"{bucket}/{urllib.parse.quote(name, safe='')}"
    emu_storage.Storage._write_config_to_file = lambda self: None
    emu_storage.DEFAULT_SOFT_DELETE_RETENTION_SECONDS = 0
    make_bucket_resource = buckets._make_bucket_resource

    def _make_bucket_resource(*args, **kwargs):
        res = make_bucket_resource(*args, **kwargs)
        res["softDeletePolicy"]["retentionDurationSeconds"] = "0"
        return res

    buckets._make_bucket_resource = _make_bucket_resource

    def _q(request, key):
        vals = request.query.get(key)
        return vals[0] if vals else None

    def _error(response, status, message):
        response.status = status
        response.json({"error": {"code": status.value, "message": message,
                                 "errors": [{"message": message, "domain": "global", "reason": status.phrase}]}})

    def _current(storage, bucket, name):
        return storage.objects.get(bucket, {}).get(name) if name else None

    def _preconditions(request, response, current, *, read, prefix="if"):
        """None when the request may go on; else the response is set (304 or 412). ``current`` is the object
        resource or None; for writes a missing object has generation 0."""
        gm, gnm = _q(request, prefix + "GenerationMatch"), _q(request, prefix + "GenerationNotMatch")
        mgm, mgnm = _q(request, prefix + "MetagenerationMatch"), _q(request, prefix + "MetagenerationNotMatch")
        if current is None and read:
            return None  # a read of a missing object is a plain 404
        gen = str(current["generation"]) if current else "0"
        mgen = str(current.get("metageneration", "1")) if current else None
        if gm is not None and gm != gen:
            _error(response, HTTPStatus.PRECONDITION_FAILED, f"ifGenerationMatch={gm}, generation is {gen}")
            return False
        if gnm is not None and gnm == gen:
            if read:
                response.status = HTTPStatus.NOT_MODIFIED
                response["x-goog-generation"] = gen
            else:
                _error(response, HTTPStatus.PRECONDITION_FAILED, f"ifGenerationNotMatch={gnm}, generation is {gen}")
            return False
        if mgm is not None and mgm != mgen:
            _error(response, HTTPStatus.PRECONDITION_FAILED, f"ifMetagenerationMatch={mgm}, is {mgen}")
            return False
        if mgnm is not None and mgnm == mgen:
            if read:
                response.status = HTTPStatus.NOT_MODIFIED
            else:
                _error(response, HTTPStatus.PRECONDITION_FAILED, f"ifMetagenerationNotMatch={mgnm}, is {mgen}")
            return False
        return None

    def _not_found(response, bucket, name):
        _error(response, HTTPStatus.NOT_FOUND, f"No such object: {bucket}/{name}")

    # Bug 4: media downloads.
    def download(request, response, storage, *args, **kwargs):
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        try:
            obj = storage.get_file_obj(bucket, name)
            content = storage.get_file(bucket, name, show_error=False)
        except NotFound:
            return _not_found(response, bucket, name)
        if _preconditions(request, response, obj, read=True) is False:
            return None
        size = len(content)
        rng = (request.get_header("Range") or "").strip()
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng)
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(size - 1, int(m.group(2))) if m.group(2) else size - 1
                else:
                    start, end = max(0, size - int(m.group(2))), size - 1
                if start >= size or end < start:
                    if size or start > 0:
                        response.status = HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE
                        response["Content-Range"] = f"bytes */{size}"
                        response["x-goog-generation"] = str(obj["generation"])
                        return None
                else:
                    content = content[start:end + 1]
                    response.status = HTTPStatus.PARTIAL_CONTENT
                    response["Content-Range"] = f"bytes {start}-{end}/{size}"
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        response["x-goog-stored-content-length"] = str(size)
        response["x-goog-stored-content-encoding"] = "identity"
        response["x-goog-hash"] = f"crc32c={obj['crc32c']},md5={obj['md5Hash']}"
        response["ETag"] = f'"{obj.get("etag") or obj["md5Hash"]}"'
        for key, value in (obj.get("metadata") or {}).items():
            if value is not None:
                response[f"x-goog-meta-{key}"] = str(value)
        if "response-content-disposition" in request.query:
            response["Content-Disposition"] = request.query["response-content-disposition"][0]
        response.write_file(content, content_type=obj.get("contentType") or "application/octet-stream")
        return None

    orig_get = objects.get

    def get(request, response, storage, *args, **kwargs):
        if _q(request, "alt") == "media":
            return download(request, response, storage)
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        if _preconditions(request, response, _current(storage, bucket, name), read=True) is False:
            return None
        return orig_get(request, response, storage)

    def _guard_write(orig, name_of):
        def handler(request, response, storage, *args, **kwargs):
            bucket = request.params.get("bucket_name")
            name = name_of(request, storage)
            if name is not None and _preconditions(request, response, _current(storage, bucket, name),
                                                   read=False) is False:
                return None
            return orig(request, response, storage)
        handler.__name__ = orig.__name__
        return handler

    def _insert_name(request, storage):
        name = _q(request, "name")
        if name is None and _q(request, "uploadType") == "multipart" and isinstance(request.data, dict):
            name = request.data["meta"].get("name")
        if name is None and isinstance(request.data, dict):
            name = request.data.get("name")
        return name

    def _upload_name(request, storage):
        upload_id = _q(request, "upload_id")
        obj = storage.resumable.get(upload_id) if upload_id else None
        return obj.get("name") if obj else None

    def _dest_name(request, storage):
        return request.params.get("dest_object_id")

    def _object_name(request, storage):
        return request.params.get("object_id")

    # Bug 3: startOffset / endOffset (and fields= ignored, all items in one page as before).
    orig_ls = objects.ls

    def ls(request, response, storage, *args, **kwargs):
        orig_ls(request, response, storage)
        start, end = _q(request, "startOffset"), _q(request, "endOffset")
        if response.status != HTTPStatus.OK or (start is None and end is None):
            return None
        body = json.loads(response._content)

        def keep(name):
            return (start is None or name >= start) and (end is None or name < end)

        body["items"] = [o for o in body.get("items") or [] if keep(o["name"])]
        body["prefixes"] = [p for p in body.get("prefixes") or [] if keep(p)]
        response.json(body)
        return None

    def delete(request, response, storage, *args, **kwargs):
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        current = _current(storage, bucket, name)
        if current is None:
            return _not_found(response, bucket, name)
        if _preconditions(request, response, current, read=False) is False:
            return None
        storage.delete_file(bucket, name)
        response.status = HTTPStatus.NO_CONTENT
        return None

    replacements = {
        objects.get: get,
        objects.download: download,
        objects.ls: ls,
        objects.delete: delete,
        objects.insert: _guard_write(objects.insert, _insert_name),
        objects.upload_partial: _guard_write(objects.upload_partial, _upload_name),
        objects.patch: _guard_write(objects.patch, _object_name),
        objects.copy: _guard_write(objects.copy, _dest_name),
        objects.rewrite: _guard_write(objects.rewrite, _dest_name),
    }
    for _regex, handlers in emu_server.HANDLERS:
        for method, fn in list(handlers.items()):
            if fn in replacements:
                handlers[method] = replacements[fn]
    for fn, new in replacements.items():
        setattr(objects, fn.__name__, new)  # the emulator's own internal calls (get -> download, ...)
    return emu_server, emu_storage, objects


class _State:
    """What the server saw, and the one lock around the (not thread-safe) emulator."""

    def __init__(self):
        import collections  # noqa: PLC0415
        self.lock = threading.Lock()
        self.log_lock = threading.Lock()
        self.connects = collections.Counter()  # CONNECT target -> count (allowed or not)
        self.refused = collections.deque(maxlen=1000)
        self.metadata = collections.deque(maxlen=1000)
        self.errors = collections.deque(maxlen=1000)
        self.requests = collections.deque(maxlen=20000)
        self.requests_total = 0
        self.t0 = time.monotonic()

    def snapshot(self, last=None):
        with self.log_lock:
            requests = list(self.requests)
            return {"connects": dict(self.connects), "refused": list(self.refused), "metadata": list(self.metadata),
                    "errors": list(self.errors), "requests": requests if last is None else requests[len(requests) - last:],
                    "requests_total": self.requests_total}


def _serve(args):
    import ssl  # noqa: PLC0415
    from http import server as http_server  # noqa: PLC0415

    import logging  # noqa: PLC0415
    for name in ("gcp_storage_emulator", "api"):  # its per-request warnings; failures go to log()["errors"]
        logging.getLogger(name).setLevel(logging.CRITICAL)
    emu_server, emu_storage, _objects = _patch_emulator()
    storage = emu_storage.Storage(use_memory_fs=True, data_dir=tempfile.gettempdir())
    state = _State()
    ssl_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ssl_ctx.load_cert_chain(args.cert, args.key)
    stop = threading.Event()

    class Handler(http_server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 120  # idle keep-alive connections end
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall each
        scheme = "http"
        tunnel_host = None

        def __init__(self, request, client_address, srv, scheme="http", tunnel_host=None):
            self.storage = storage
            self.scheme, self.tunnel_host = scheme, tunnel_host
            super().__init__(request, client_address, srv)

        def log_message(self, format, *a):  # noqa: A002
            pass

        def log_request(self, code="-", size="-"):
            with state.log_lock:
                state.requests_total += 1
                now = time.monotonic()
                state.requests.append({"host": self.tunnel_host or "local", "method": self.command,
                                       "path": self.path, "status": int(getattr(code, "value", code) or 0),
                                       "t": round(now - state.t0, 4),
                                       "dt": round(now - getattr(self, "_t_start", now), 4)})
                if getattr(self, "headers", None) is not None and self.headers.get("Transfer-Encoding"):
                    state.requests[-1]["transfer_encoding"] = self.headers.get("Transfer-Encoding")

        # ---- body (bug 1: chunked framing wins over Content-Length)
        def _read_body(self):
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                parts = []
                while True:
                    line = self.rfile.readline(65537).split(b";", 1)[0].strip()
                    size = int(line, 16) if line else 0
                    if size == 0:
                        while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        break
                    parts.append(self.rfile.read(size))
                    self.rfile.readline(65537)
                return b"".join(parts)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status, body=b"", ctype="text/plain", headers=()):
            if isinstance(body, (dict, list)):
                body, ctype = json.dumps(body).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _dispatch(self, method):
            self._t_start = time.monotonic()
            if self.path.startswith(("http://", "https://")):
                with state.log_lock:
                    state.refused.append({"kind": "absolute-form", "method": method, "target": self.path})
                self._body = self._read_body()
                self.close_connection = True
                return self._send(403, b"refused: the test GCS server proxies only " + ",".join(SERVED_HOSTS).encode())
            self._body = self._read_body()
            path = urllib.parse.urlsplit(self.path).path
            if path.startswith("/computeMetadata"):
                with state.log_lock:
                    state.metadata.append({"method": method, "path": self.path, "host": self.tunnel_host or "local"})
                return self._send(404, b"not a GCE metadata server")
            if self.tunnel_host == "oauth2.googleapis.com":
                return self._send(200, {"access_token": TEST_TOKEN, "expires_in": 3600, "token_type": "Bearer"})
            if self.tunnel_host is None and path.startswith("/_test/"):
                return self._internal(method, path)
            try:
                with state.lock:
                    emu_server.Router(self).handle(method)
            except Exception as e:  # noqa: BLE001
                import traceback  # noqa: PLC0415
                with state.log_lock:
                    state.errors.append({"method": method, "path": self.path, "error": repr(e),
                                         "traceback": traceback.format_exc()[-3000:]})
                self.close_connection = True
                try:
                    self._send(500, {"error": {"code": 500, "message": repr(e)}})
                except OSError:
                    pass
            return None

        def _internal(self, method, path):
            if path == "/_test/log":
                last = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("requests")
                return self._send(200, state.snapshot(int(last[0]) if last else None))
            if path == "/_test/shutdown" and method == "POST":
                self._send(200, {"ok": True})
                stop.set()
                return None
            if path.startswith("/_test/buckets/") and method == "DELETE":
                name = urllib.parse.unquote(path[len("/_test/buckets/"):])
                with state.lock:
                    for obj_name in list(storage.objects.get(name, {})):
                        storage._hard_delete_file(name, obj_name)
                    for upload_id in [k for k, v in storage.resumable.items() if v.get("bucket") == name]:
                        del storage.resumable[upload_id]
                    if name in storage.buckets:
                        storage.delete_bucket(name)
                return self._send(200, {"ok": True})
            return self._send(404, b"unknown test endpoint")

        def do_CONNECT(self):
            target = self.path
            host, _, port = target.rpartition(":")
            allowed = self.tunnel_host is None and host in SERVED_HOSTS and port == "443"
            with state.log_lock:
                state.connects[target] += 1
                if not allowed:
                    state.refused.append({"kind": "CONNECT", "method": "CONNECT", "target": target})
            self.close_connection = True
            if not allowed:
                return self._send(403, b"refused: the test GCS server proxies only " + ",".join(SERVED_HOSTS).encode())
            self.send_response(200, "Connection established")
            self.end_headers()
            self.wfile.flush()
            try:
                tls = ssl_ctx.wrap_socket(self.connection, server_side=True)
            except ConnectionError:
                return None  # the client hung up (a process that exited mid-request), as in Server.handle_error
            except (ssl.SSLError, OSError) as e:
                with state.log_lock:
                    state.errors.append({"method": "CONNECT", "path": target, "error": f"TLS handshake: {e!r}"})
                return None
            try:
                Handler(tls, self.client_address, self.server, scheme="https", tunnel_host=host)
            finally:
                try:
                    tls.close()
                except OSError:
                    pass
            return None

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

        def do_PATCH(self):
            self._dispatch("PATCH")

        def do_DELETE(self):
            self._dispatch("DELETE")

        def do_HEAD(self):  # answered as GET; the connection then closes, so a body a HEAD client skips is harmless
            self.close_connection = True
            self._dispatch("GET")

    class Server(http_server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

        def handle_error(self, request, client_address):
            exc = sys.exc_info()[1]
            if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
                return  # a client hung up
            with state.log_lock:
                state.errors.append({"method": "?", "path": "?", "error": repr(exc)})

    httpd = Server((_LOOPBACK, 0), Handler)
    port = httpd.server_address[1]
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, args.port_file)

    def watchdog():
        deadline = time.monotonic() + args.lifetime
        while not stop.wait(0.5):
            if os.getppid() != args.parent_pid:
                print("gcs_server: parent gone, exiting", flush=True)
                # nobody will call stop(): remove the temp dir (certificates, port file, this log) ourselves
                shutil.rmtree(os.path.dirname(os.path.abspath(args.port_file)), ignore_errors=True)
                break
            if time.monotonic() > deadline:
                print(f"gcs_server: lifetime of {args.lifetime} s over, exiting", flush=True)
                break
        stop.set()
        httpd.shutdown()

    threading.Thread(target=watchdog, daemon=True).start()
    print(f"gcs_server: serving on {_LOOPBACK}:{port}", flush=True)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()
    os._exit(0)  # do not wait for open keep-alive connection threads


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--lifetime", type=float, default=DEFAULT_LIFETIME_S)
    parser.add_argument("--parent-pid", type=int, required=True)
    _serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
