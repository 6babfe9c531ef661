"""Test setup: 8 simulated CPU devices (set before jax is imported) and paths to shared data."""
import os
import pathlib


def _with_device_count(flags: str, count: int = 8) -> str:
    """``flags`` with ``--xla_force_host_platform_device_count`` forced to ``count`` (an inherited XLA_FLAGS
    keeps its other flags; a different device count in it would leave the multi-device tests without devices)."""
    kept = [f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={count}"])


os.environ["XLA_FLAGS"] = _with_device_count(os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data; tests that need it skip with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real face data not available: {SHARED_DATA} is absent (only in the project workspace)")
    return SHARED_DATA
