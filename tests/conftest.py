"""Test setup: 8 simulated CPU devices (set before jax is imported) and paths to shared data."""
import atexit
import os
import pathlib
import shutil
import tempfile


def _with_device_count(flags: str, count: int = 8) -> str:
    """``flags`` with ``--xla_force_host_platform_device_count`` forced to ``count`` (an inherited XLA_FLAGS
    keeps its other flags; a different device count in it would leave the multi-device tests without devices)."""
    kept = [f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={count}"])


# The environment as the session found it: the loopback Cloud Storage server (``gcs_server``) points the proxy
# variables at itself for the rest of the session, and a test that must reach the real package index (the
# install-extras check) takes them from here.
ENV_AT_START = dict(os.environ)
os.environ["XLA_FLAGS"] = _with_device_count(os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def _session_compile_cache() -> str:
    """One persistent XLA compilation cache for this test session, fresh at its start: the in-process tests, the
    test workers (pytest-xdist inherits the environment of the process that loaded this file first) and every
    `adaface-jax` subprocess share it, so a program the suite compiles twice (the tiny trainer of the CLI tests,
    the same backbone in several files) is compiled once. It is not the user's ~/.cache: a suite that found a warm
    cache there would time and test differently on a fresh machine. Removed when the session ends."""
    path = os.environ.get("ADAFACE_TEST_XLA_CACHE")
    if path is None:
        path = tempfile.mkdtemp(prefix="adaface-jax-test-xla-")
        os.environ["ADAFACE_TEST_XLA_CACHE"] = path
        atexit.register(shutil.rmtree, path, True)
    os.environ["ADAFACE_JAX_CACHE"] = path               # `adaface-jax train`'s cache (cli/train.py)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path       # every other JAX program, in-process or not
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return path


COMPILE_CACHE = _session_compile_cache()

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _runs_long(item) -> bool:
    return (any(item.get_closest_marker(name) for name in ("slow", "multiprocess", "notebook"))
            or item.nodeid.startswith("tests/e2e/"))


def pytest_collection_modifyitems(items):
    # The marker follows the fixture, so `-m "not needs_shared_data"` selects exactly the tests that never skip for
    # want of ../shared.
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.needs_shared_data)
    # The long tier first (a stable sort keeps the rest in file order): under pytest-xdist both workers start on
    # the long tests and the short ones fill in after, instead of one worker finishing a minute-long test alone
    # at the end.
    items.sort(key=lambda item: not _runs_long(item))


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data; tests that need it skip with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real face data not available: {SHARED_DATA} is absent (only in the project workspace)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gcs_server():
    """A real Cloud Storage API server on 127.0.0.1 for the session (tests/support/gcs_server.py: gcp-storage-emulator
    behind a CONNECT/TLS proxy for TensorFlow). Its ``.env`` is set into ``os.environ`` for the session, so the
    in-process clients (tf.io.gfile, etils.epath, tensorstore/orbax, google-cloud-storage) reach it; a child
    process needs ``env={**os.environ, **gcs_server.env}``. The environment is restored and the server stopped
    at the end of the session."""
    from tests.support.gcs_server import GcsServer  # noqa: PLC0415

    server = GcsServer().start()
    saved = {key: os.environ.get(key) for key in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def gcs_bucket(gcs_server):
    """A fresh, empty bucket on ``gcs_server``, as its URL ``"gs://b-<hex>"`` (no trailing slash); it and its
    objects are deleted after the test."""
    name = gcs_server.make_bucket()
    yield f"gs://{name}"
    gcs_server.delete_bucket(name)
