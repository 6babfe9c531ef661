"""The accelerator and bucket extras of setup.cfg resolve, to the versions ``jax``'s own extras ask for.

``pip install ".[cuda12]"`` (or ``cuda13``, ``tpu``) on a GPU host or a TPU VM must give the JAX plugin,
its PJRT runtime and libtpu exactly as ``jax[cuda12]`` / ``jax[tpu]`` of our pinned jax would. ``gcs``
must install next to every pin of ``install_requires`` (google-cloud-storage brings protobuf and
google-api-core, which meet our protobuf pin).

How, without downloading GBs: ``pip install --dry-run --ignore-installed --report -`` resolves the
requirements and prints what it would install, with each package's metadata. pip reads that metadata
from the index (PEP 658) when the index serves it; where it does not, ``--use-feature=fast-deps``
makes pip read a wheel's METADATA with HTTP range requests instead of downloading the wheel (the
CUDA 12 set alone is ~3.2 GB of wheels). Measured on the 2-core machine (2026-12, an index without PEP 658
metadata): each accelerator extra ~5 s and ~5 MB, ``gcs`` next to every pin ~18 s and ~37 MB (almost all
of it the index pages of our ~100 dependencies); ~35 s in all.

The accelerator extras are resolved next to the pins of jax and of what jax depends on (jax, jaxlib,
numpy, ml_dtypes, scipy): their wheels depend on nothing else, and the test checks that every resolved
package that ``install_requires`` pins got the pinned version, so a new overlap cannot slip by.

The network tests skip, with the reason, only when the package index cannot be reached (a connection
error); every other failure of pip fails the test.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from tests.support import REPO as REPO_ROOT

ROOT = REPO_ROOT
ACCELERATOR_EXTRAS = ("cuda12", "cuda13", "tpu")
# jax and its dependencies: what the accelerator wheels are resolved next to
JAX_FAMILY = {"jax", "jaxlib", "numpy", "ml-dtypes", "scipy", "opt-einsum"}
DEFAULT_INDEX = "https://pypi.org/simple"
# pip's words for "the index cannot be reached"; anything else is a real failure
CONNECTION_ERRORS = ("NewConnectionError", "Failed to establish a new connection",
                     "Temporary failure in name resolution", "Name or service not known", "nodename nor servname",
                     "Network is unreachable", "No route to host", "Connection refused", "ConnectTimeoutError",
                     "Connection to ", "ProxyError")


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    return cfg


def _requirements(text: str) -> list[Requirement]:
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [Requirement(line) for line in lines if line]


def _extras() -> dict[str, list[Requirement]]:
    return {name: _requirements(text) for name, text in _setup_cfg()["options.extras_require"].items()}


def _install_requires() -> list[Requirement]:
    return _requirements(_setup_cfg()["options"]["install_requires"])


def _exact_version(req: Requirement):
    """'1.2.3' for a requirement pinned as ``==1.2.3`` (no wildcard), else None."""
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator in ("==", "===") and not specs[0].version.endswith("*"):
        return specs[0].version
    return None


def test_extras_are_declared_and_pinned():
    """No network: the four extras exist, every accelerator package is pinned exactly, and a
    google-cloud-storage pin in another extra (dev) is the same as gcs's."""
    extras = _extras()
    for name in (*ACCELERATOR_EXTRAS, "gcs"):
        assert extras.get(name), f"setup.cfg [options.extras_require] has no '{name}'"
    for name in ACCELERATOR_EXTRAS:
        for req in extras[name]:
            assert _exact_version(req) or not req.specifier, f"{name}: {req} is neither pinned (==) nor left to jax"
    gcs = {canonicalize_name(r.name): r for r in extras["gcs"]}
    assert _exact_version(gcs["google-cloud-storage"]), f"gcs: {gcs['google-cloud-storage']} is not pinned (==)"
    for name, reqs in extras.items():
        for req in reqs:
            if canonicalize_name(req.name) == "google-cloud-storage":
                assert req.specifier == gcs["google-cloud-storage"].specifier, \
                    f"extra '{name}' pins {req} but gcs pins {gcs['google-cloud-storage']}"
    pins = {canonicalize_name(r.name): _exact_version(r) for r in _install_requires()}
    assert pins.get("jax") and pins.get("jaxlib"), "install_requires must pin jax and jaxlib exactly"


# ----------------------------------------------------------------------------------------------------
# resolution against the package index


# What the loopback Cloud Storage server of other tests (tests/support/gcs_server.py) sets for the session: pip and the
# index probe use the values the session started with.
NETWORK_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
                "no_proxy", "CURL_CA_BUNDLE")


def _outside_env(**extra) -> dict:
    from tests.conftest import ENV_AT_START  # noqa: PLC0415
    env = {k: v for k, v in os.environ.items() if k not in NETWORK_VARS}
    env.update({k: ENV_AT_START[k] for k in NETWORK_VARS if k in ENV_AT_START})
    return {**env, **extra}


def _index_url() -> str:
    """The index pip uses: PIP_INDEX_URL, an index-url in pip's configuration, else PyPI."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"].split()[0]
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    found = re.search(r"^(?:global|install|:env:)\.index-url='([^']+)'", out, re.M)
    return found.group(1) if found else DEFAULT_INDEX


def _unreachable(reason) -> bool:
    """True for a failure to connect (DNS, refused, unreachable, timed out), not for TLS or HTTP errors."""
    if isinstance(reason, urllib.error.URLError):
        reason = reason.reason
    if isinstance(reason, ssl.SSLError) or isinstance(reason, urllib.error.HTTPError):
        return False
    return isinstance(reason, (socket.gaierror, socket.timeout, TimeoutError, ConnectionError, OSError))


@pytest.fixture(scope="module")
def pip_index(tmp_path_factory):
    """The index URL, and an empty pip cache for this module's resolutions; skips when the index cannot be
    reached at all."""
    index = _index_url().rstrip("/")
    if index.startswith(("http://", "https://")):
        context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
        env, proxies = _outside_env(), {}
        for scheme in ("https", "http"):
            value = env.get(f"{scheme}_proxy") or env.get(f"{scheme.upper()}_PROXY")
            if value:
                proxies[scheme] = value
        opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies),
                                             urllib.request.HTTPSHandler(context=context))
        try:
            opener.open(f"{index}/pip/", timeout=30).close()
        except (urllib.error.URLError, OSError) as e:
            if _unreachable(e):
                pytest.skip(f"the package index {index} cannot be reached: {e}")
    return index, tmp_path_factory.mktemp("pip-cache")


def _resolve(requirements: list[str], cache_dir: Path) -> dict[str, dict]:
    """What ``pip install`` would install for ``requirements`` on this interpreter: {name: report item}."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-",
           "--use-feature=fast-deps", "--disable-pip-version-check", "--no-input", "--retries", "2",
           "--timeout", "60", *requirements]
    env = _outside_env(PIP_CACHE_DIR=str(cache_dir))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=cache_dir)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pip took over 10 minutes to resolve {requirements}: is it downloading whole wheels?")
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if any(m in line for m in CONNECTION_ERRORS)]
        if lines:
            pytest.skip(f"the package index cannot be reached: {lines[-1].strip()[:300]}")
        pytest.fail(f"pip could not resolve {requirements} (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout)
    return {canonicalize_name(item["metadata"]["name"]): item for item in report["install"]}


def _version(resolved: dict, name: str) -> str:
    item = resolved.get(canonicalize_name(name))
    assert item is not None, f"{name} was not resolved"
    return item["metadata"]["version"]


def _check_pins_kept(resolved: dict, label: str) -> None:
    for req in _install_requires():
        name = canonicalize_name(req.name)
        if name in resolved:
            version = _version(resolved, name)
            assert req.specifier.contains(version, prereleases=True), \
                f"{label}: resolves {req.name} {version}, but install_requires asks for {req}"


def _check_own_requirements(resolved: dict, extra: list[Requirement], label: str) -> None:
    """Our extra's versions were chosen, and they meet each other's requirements (the plugin's pjrt pin)."""
    ours = {canonicalize_name(r.name): r for r in extra}
    for req in extra:
        version = _version(resolved, req.name)
        assert req.specifier.contains(version, prereleases=True), \
            f"{label}: {req.name} resolved to {version}, not {req}"
        for dep in resolved[canonicalize_name(req.name)]["metadata"].get("requires_dist") or []:
            dep = Requirement(dep)
            wanted = [{"extra": e} for e in (req.extras or {""})] + [{"extra": ""}]
            if dep.marker is not None and not any(dep.marker.evaluate(w) for w in wanted):
                continue
            pinned = ours.get(canonicalize_name(dep.name))
            if pinned is not None and _exact_version(pinned):
                assert dep.specifier.contains(_exact_version(pinned), prereleases=True), \
                    f"{label}: {req.name} {version} requires {dep}, but the extra pins {pinned}"


@pytest.mark.slow
@pytest.mark.parametrize("extra", ACCELERATOR_EXTRAS)
def test_accelerator_extra_matches_jax(extra, pip_index):
    """``.[cuda12]`` / ``.[cuda13]`` / ``.[tpu]`` resolve, and to what ``jax[<extra>]`` of the pinned jax asks
    for: every package of jax's extra is in ours (or in install_requires) at a version jax accepts, with the
    same pip extras (``[with-cuda]``: the CUDA libraries as wheels)."""
    _, cache = pip_index
    ours = _extras()[extra]
    pins = [r for r in _install_requires() if canonicalize_name(r.name) in JAX_FAMILY]
    resolved = _resolve([str(r) for r in pins + ours], cache)
    label = f".[{extra}]"
    _check_pins_kept(resolved, label)
    _check_own_requirements(resolved, ours, label)

    jax_meta = resolved["jax"]["metadata"]
    assert extra in [canonicalize_name(e) for e in jax_meta.get("provides_extra") or []], \
        f"jax {jax_meta['version']} has no extra '{extra}'"
    declared = {canonicalize_name(r.name): r for r in ours + _install_requires()}
    jax_wants = []
    for text in jax_meta.get("requires_dist") or []:
        req = Requirement(text)
        if req.marker is not None and req.marker.evaluate({"extra": extra}) and not req.marker.evaluate({"extra": ""}):
            req.marker = None  # shown as jax lists it, less the "; extra == ..." marker
            jax_wants.append(req)
    assert jax_wants, f"jax {jax_meta['version']}[{extra}] requires nothing?"
    for req in jax_wants:
        name = canonicalize_name(req.name)
        assert name in declared, \
            f"{label}: jax[{extra}] requires {req}, which neither the extra nor install_requires lists"
        version = _version(resolved, name)
        assert req.specifier.contains(version, prereleases=True), \
            f"{label}: {req.name} resolves to {version}, but jax {jax_meta['version']}[{extra}] requires {req}"
        assert req.extras <= declared[name].extras, \
            f"{label}: jax[{extra}] asks for {req} (with {sorted(req.extras)}), the extra lists {declared[name]}"


@pytest.mark.slow
def test_gcs_extra_resolves_next_to_every_pin(pip_index):
    """``.[gcs]``: google-cloud-storage at its pin installs together with all of install_requires (protobuf
    and the google-api-core family included), and every pin is kept."""
    _, cache = pip_index
    ours = _extras()["gcs"]
    resolved = _resolve([str(r) for r in _install_requires() + ours], cache)
    _check_pins_kept(resolved, ".[gcs]")
    _check_own_requirements(resolved, ours, ".[gcs]")
    assert "google-api-core" in resolved, "google-cloud-storage without google-api-core?"
