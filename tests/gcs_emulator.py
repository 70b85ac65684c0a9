"""A Google Cloud Storage server on 127.0.0.1 for tests: `gcp-storage-emulator` (GCS's JSON API) in a subprocess.

    with gcs_emulator() as gcs:                      # starts it, waits until it answers, stops it afterwards
        subprocess.run([...], env=gcs.child_env())   # a child that writes gs://{gcs.bucket}/... through it
        with gcs.environ():                          # or this process, if nothing has read the variables yet
            ...

`gcs.env` holds the variables that point every GCS client we use at the emulator and keep all of them off the
network (no metadata server, no credentials, no proxy): see `emulator_env`. Fixtures: `gcs_server` (one emulator
per test session) and `gcs` (the same server, a fresh bucket per test).

Prefer a child process: tensorstore and gcsfs read their endpoint variables at each use, but fsspec reads
FSSPEC_GCS_TOKEN when it is imported, gcsfs GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when it is imported, and google-auth
its GCE_METADATA_* / NO_GCE_CHECK when google.auth.compute_engine is imported; in a pytest process other test
modules may have imported them already.

The server is `python -m gcp_storage_emulator start` patched where our clients need GCS's behaviour
(`_patch_emulator`: objects.moveTo, generation headers on downloads, ifGenerationMatch / ifGenerationNotMatch); it
is single-threaded, answers each request on its own connection, ignores credentials, and ends when the process
that started it ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

DEFAULT_BUCKET = "vdit-test"  # tensorstore insists on a valid GCS name (3-63 chars: a-z, 0-9, '-', '_', '.')
_PARENT_VAR = "VDIT_GCS_EMULATOR_PARENT_PID"


def emulator_env(url: str, config_dir: str, metadata_port: int) -> dict[str, str]:
    """The environment a process needs so that everything it does with gs:// goes to the emulator at `url`.

    `config_dir` is an empty directory (stands in for ~/.config/gcloud); `metadata_port` is a 127.0.0.1 port nothing
    listens on (stands in for the GCE metadata server).
    """
    host = url.split("://", 1)[1]
    no_proxy = ",".join(
        sorted({"127.0.0.1", "localhost", host, *filter(None, os.environ.get("NO_PROXY", "").split(","))})
    )
    return {
        # gcsfs (what etils.epath uses for gs://) and google-cloud-storage (tensorboardX's gs:// writer) send their
        # JSON-API and upload requests here; google-cloud-storage also switches to anonymous credentials.
        "STORAGE_EMULATOR_HOST": url,
        # tensorstore (orbax's array writer, the gcs kvstore driver) sends its requests here ...
        "TENSORSTORE_GCS_HTTP_URL": url,
        # ... with this fixed bearer token, the first thing its credentials lookup checks: no ADC file, no
        # metadata server. The emulator ignores the Authorization header.
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
        # google-cloud-cpp's storage client, which array_record's C++ reader (tfds.data_source on a gs:// data_dir)
        # has built in: its emulator endpoint (with it, no credentials lookup; without it, a gs:// read hangs).
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
        # gcsfs: token='anon' (fsspec reads FSSPEC_<PROTOCOL>_<KWARG> as defaults for every GCSFileSystem), so it
        # skips google.auth.default() and the GCE probe that token=None starts with.
        "FSSPEC_GCS_TOKEN": "anon",
        "FSSPEC_GS_TOKEN": "anon",
        # gcsfs >= 2025.x wraps GCSFileSystem in ExtendedGcsFileSystem, which asks the Storage Control gRPC API for
        # the bucket type before many calls (the emulator has no gRPC: each call fails, is retried and logged as
        # 'Could not determine bucket type'); off, gcsfs is its plain JSON-API client.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # google-auth, for anything that still calls google.auth.default(): no real credentials files ...
        "GOOGLE_APPLICATION_CREDENTIALS": "",
        "CLOUDSDK_CONFIG": config_dir,  # also where tensorstore looks for application_default_credentials.json
        # ... no probe of the GCE metadata server (169.254.169.254 / metadata.google.internal): NO_GCE_CHECK=true
        # makes google-auth skip it (gcsfs skips its 'cloud' method too), and the host/IP variables send any probe
        # that still happens (google-auth, tensorstore's GCE_METADATA_ROOT) to a dead loopback port.
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": f"127.0.0.1:{metadata_port}",
        "GCE_METADATA_ROOT": f"127.0.0.1:{metadata_port}",
        "GCE_METADATA_IP": f"127.0.0.1:{metadata_port}",
        # A project id, so that nothing asks google-auth or gcloud for one.
        "GOOGLE_CLOUD_PROJECT": "test-project",
        # A developer's HTTP(S)_PROXY must not carry loopback requests off the machine (requests, aiohttp with
        # trust_env, curl inside tensorstore all read these).
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
    """A running emulator. `env` is only the added variables; `child_env()` is a whole environment for a child."""

    url: str  # http://127.0.0.1:PORT
    port: int
    bucket: str  # created when the server started
    env: dict[str, str]
    pid: int
    log_path: str  # the emulator's stdout and stderr (one line per request)
    data_dir: str | None  # where it keeps objects (None: in memory)
    startup_s: float  # from Popen to the first good answer

    def uri(self, *parts: str, bucket: str | None = None) -> str:
        """gs://BUCKET/part/part..."""
        return "/".join([f"gs://{bucket or self.bucket}", *(p.strip("/") for p in parts if p)])

    def child_env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        return {**(os.environ if base is None else base), **self.env, **extra}

    @contextlib.contextmanager
    def environ(self) -> Iterator[None]:
        """Sets `env` in this process's os.environ for the block, then restores it. Libraries that read a variable
        once (google-auth's metadata host, tensorstore's GCS URL) keep the first value they read."""
        with patched_environ(self.env):
            yield

    def create_bucket(self, name: str) -> None:
        _request(f"{self.url}/storage/v1/b?project=test-project", method="POST", body={"name": name})

    def list_objects(self, prefix: str = "", bucket: str | None = None) -> list[str]:
        """Object names under prefix, straight from the server's JSON API (no client library in between)."""
        names, token = [], None
        while True:
            q = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            page = _request(f"{self.url}/storage/v1/b/{bucket or self.bucket}/o?{q}")
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)

    def read_object(self, name: str, bucket: str | None = None) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        return _request(f"{self.url}/storage/v1/b/{bucket or self.bucket}/o/{quoted}?alt=media", raw=True)

    def log_tail(self, n_chars: int = 4000) -> str:
        return _tail(self.log_path, n_chars)


class EmulatorStartError(RuntimeError):
    pass


@contextlib.contextmanager
def patched_environ(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def gcs_emulator(
    bucket: str = DEFAULT_BUCKET,
    *,
    in_memory: bool = False,
    workdir: str | None = None,
    start_timeout_s: float = 30.0,
    attempts: int = 3,
) -> Iterator[GcsEmulator]:
    """Starts `python -m gcp_storage_emulator start` on 127.0.0.1 at a free port with `bucket` created, waits until
    it serves that bucket, yields a GcsEmulator, and stops it (SIGINT, then SIGKILL) afterwards.

    Objects are kept on disk under `workdir` (a temporary directory if None; removed afterwards unless given) or
    in memory. A port taken by someone else between our probe and the emulator's bind is retried on a new port
    (`attempts` times); a server that does not answer within `start_timeout_s` raises EmulatorStartError with the
    tail of its log.
    """
    own_dir = workdir is None
    root = tempfile.mkdtemp(prefix="gcs-emulator-") if own_dir else workdir
    os.makedirs(root, exist_ok=True)
    config_dir = os.path.join(root, "gcloud-config")  # empty: no credentials to find
    os.makedirs(config_dir, exist_ok=True)
    data_dir = None if in_memory else os.path.join(root, "data")
    try:
        errors = []
        for attempt in range(attempts):
            port = _free_port()
            log_path = os.path.join(root, f"emulator-{port}.log")
            proc, startup_s, error = _start(port, bucket, data_dir, log_path, start_timeout_s)
            if proc is not None:
                break
            errors.append(error)
            if "Address already in use" not in error or attempt == attempts - 1:
                raise EmulatorStartError("\n\n".join(errors))
        url = f"http://127.0.0.1:{port}"
        emulator = GcsEmulator(
            url=url,
            port=port,
            bucket=bucket,
            env=emulator_env(url, config_dir, metadata_port=_free_port()),
            pid=proc.pid,
            log_path=log_path,
            data_dir=data_dir,
            startup_s=startup_s,
        )
        try:
            yield emulator
        finally:
            _stop(proc)
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


def _start(port, bucket, data_dir, log_path, timeout_s):
    """(process, seconds to start, None) or (None, None, error text); a failed process is stopped."""
    # `python -m gcp_storage_emulator` through _serve below (this file run as a script): see _patch_emulator.
    cmd = [sys.executable, os.path.abspath(__file__)]
    if data_dir is not None:
        cmd += ["--data-dir", data_dir]
    cmd += ["start", "--host=127.0.0.1", f"--port={port}", f"--default-bucket={bucket}"]
    if data_dir is None:
        cmd.append("--in-memory")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", _PARENT_VAR: str(os.getpid())}
    if data_dir is not None:
        env["STORAGE_BASE"] = data_dir
    t0 = time.monotonic()
    with open(log_path, "wb") as log:  # a file, not a pipe: the server logs every request and must never block
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/storage/v1/b/{bucket}"
    last = "no answer yet"
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            last = f"the emulator exited with code {proc.returncode}"
            break
        if "Address already in use" in _tail(log_path, 20000):
            # The bind happens in a server thread; the main thread would wait forever.
            last = "port taken"
            break
        try:
            answer = _request(url, timeout=2)
        except (OSError, urllib.error.URLError, ValueError) as e:
            last = f"{type(e).__name__}: {e}"
            time.sleep(0.05)
            continue
        if answer.get("name") == bucket:  # our server (not another one that won the port), bucket created
            return proc, time.monotonic() - t0, None
        last = f"unexpected answer from {url}: {answer!r}"
        break
    else:
        last = f"no answer within {timeout_s:.0f} s (last: {last})"
    _stop(proc, timeout_s=0)  # never served a request: nothing to shut down cleanly
    return (
        None,
        None,
        f"gcp_storage_emulator did not start on 127.0.0.1:{port}: {last}.\ncommand: {' '.join(cmd)}\n"
        f"its output ({log_path}):\n{_tail(log_path, 4000)}",
    )


def _stop(proc: subprocess.Popen, timeout_s: float = 2.0) -> None:
    """SIGINT (the emulator catches KeyboardInterrupt and shuts its server down), then SIGKILL after `timeout_s`:
    every object is already on disk (or in memory only) when its request is answered, so nothing is lost."""
    if proc.poll() is None:
        if timeout_s > 0:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy


def _request(url, *, method="GET", body=None, raw=False, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with _OPENER.open(req, timeout=timeout) as r:
        content = r.read()
    return content if raw else json.loads(content or b"{}")


def _tail(path: str, n_chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n_chars))
            return f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no log: {e})"


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GcsEmulator]:
    """One emulator for the test session (in memory)."""
    with gcs_emulator(in_memory=True) as server:
        yield server


@pytest.fixture
def gcs(gcs_server: GcsEmulator) -> GcsEmulator:
    """The session's emulator with a fresh, empty bucket for this test."""
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    gcs_server.create_bucket(bucket)
    return dataclasses.replace(gcs_server, bucket=bucket)


def _move(request, response, storage, *args, **kwargs):
    """POST /storage/v1/b/BUCKET/o/SRC/moveTo/o/DEST (objects.move: an atomic rename within a bucket). The emulator
    answers 501 for it, which gcsfs retries 6 times with back-off (~30 s) before falling back to copy + delete on
    every rename; here it is copy + delete inside the (single-threaded) server, so atomic to its clients."""
    from http import HTTPStatus

    from gcp_storage_emulator.exceptions import Conflict, NotFound
    from gcp_storage_emulator.handlers import objects

    bucket = request.params["bucket_name"]
    src, dest = request.params["object_id"], request.params["dest_object_id"]
    try:
        dest_obj = objects._copy(request.base_url, storage, bucket, src, bucket, dest)
        storage.delete_file(bucket, src)
        response.json(dest_obj)
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
    except Conflict as err:
        objects._handle_conflict(response, err)


def _exit_with_parent(parent_pid: int) -> None:
    """Ends this process when the process that started it is gone (a test runner killed with -9 leaves no server)."""
    import threading

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _preconditions(request, storage, bucket, name, *, read):
    """The HTTP status that GCS's ifGenerationMatch / ifGenerationNotMatch parameters call for, or None to go on.

    ifGenerationMatch=N: the live object's generation must be N (0: there must be none), else 412 (a read of a
    missing object goes on to its 404). ifGenerationNotMatch=N: it must not be N, else 304 for a read, 412 for a
    write. The emulator ignores both; tensorstore's OCDBT (orbax's arrays) relies on them."""
    from gcp_storage_emulator.exceptions import NotFound

    match = request.query.get("ifGenerationMatch", [None])[0]
    not_match = request.query.get("ifGenerationNotMatch", [None])[0]
    if (match is None and not_match is None) or name is None:
        return None
    try:
        generation = int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        generation = None
    if match is not None and (generation or 0) != int(match) and not (read and generation is None):
        return 412
    if not_match is not None and generation is not None and generation == int(not_match):
        return 304 if read else 412
    return None


def _patch_emulator() -> None:
    """Brings the emulator's JSON API closer to GCS where our clients need it:

    - objects.moveTo (gcsfs renames; see `_move`);
    - x-goog-generation / x-goog-metageneration headers on media downloads: tensorstore takes an object's generation
      from them, and without them reads generation 0, which it later rejects as 'Malformed StorageGeneration' in a
      conditional write (an orbax save fails now and then);
    - ifGenerationMatch / ifGenerationNotMatch on downloads, metadata reads, uploads and deletes (412 / 304).
    """
    from http import HTTPStatus

    from gcp_storage_emulator import server, settings
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    original = {f: getattr(objects, f) for f in ("download", "get", "insert", "delete")}

    def refuse(response, status):
        response.status = HTTPStatus(status)
        if status == 412:
            response.json(
                {"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold."}}
            )

    def download(request, response, storage, *args, **kwargs):
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        status = _preconditions(request, storage, bucket, name, read=True)
        if status:
            return refuse(response, status)
        try:
            obj = storage.get_file_obj(bucket, name)
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
            response["x-goog-stored-content-length"] = str(obj["size"])
        except NotFound:
            pass  # the original answers 404
        return original["download"](request, response, storage, *args, **kwargs)

    def get(request, response, storage, *args, **kwargs):
        if request.query.get("alt", [None])[0] == "media":
            return download(request, response, storage, *args, **kwargs)
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        status = _preconditions(request, storage, bucket, name, read=True)
        if status:
            return refuse(response, status)
        return original["get"](request, response, storage, *args, **kwargs)

    def insert(request, response, storage, *args, **kwargs):
        name = request.query.get("name", [None])[0]
        status = _preconditions(request, storage, request.params["bucket_name"], name, read=False)
        if status:
            _ = request.data  # read the body before answering: the client is still sending it
            return refuse(response, status)
        return original["insert"](request, response, storage, *args, **kwargs)

    def delete(request, response, storage, *args, **kwargs):
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        status = _preconditions(request, storage, bucket, name, read=False)
        if status:
            return refuse(response, status)
        return original["delete"](request, response, storage, *args, **kwargs)

    replaced = {original["download"]: download, original["get"]: get, original["insert"]: insert}
    replaced[original["delete"]] = delete
    for f, wrapper in (("download", download), ("get", get), ("insert", insert), ("delete", delete)):
        setattr(objects, f, wrapper)  # the router falls back to objects.insert by name
    move_route = (
        rf"^{re.escape(settings.API_ENDPOINT)}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
        r"(?P<dest_object_id>.*[^/]+)$",
        {server.POST: _move},
    )
    server.HANDLERS = (
        move_route,
        *((regex, {m: replaced.get(h, h) for m, h in handlers.items()}) for regex, handlers in server.HANDLERS),
    )


def _serve(argv: list[str]) -> None:
    """`python -m gcp_storage_emulator ARGS`, patched by `_patch_emulator`."""
    if os.environ.get(_PARENT_VAR):
        _exit_with_parent(int(os.environ[_PARENT_VAR]))
    from gcp_storage_emulator import __main__ as emulator_main

    _patch_emulator()
    emulator_main.main(argv)


if __name__ == "__main__":
    _serve(sys.argv[1:])
