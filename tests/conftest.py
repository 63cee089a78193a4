"""Shared fixtures: tiny models, an offline and network-free environment, the real-CXR folder."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cxrcommon.optional import available  # noqa: E402

REALCXR = ROOT.parent / "shared" / "data" / "realcxr"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The cpu torch route (scripts/setup.sh) installs no torchvision / torch-fidelity: tests of the features that
# need them skip there, and tests/test_optional.py checks those features then refuse with the fix.
needs_torchvision = pytest.mark.skipif(not available("torchvision"),
                                       reason="torchvision not installed (cpu torch route)")
needs_torch_fidelity = pytest.mark.skipif(not (available("torchvision") and available("torch_fidelity")),
                                          reason="torch-fidelity not installed (cpu torch route)")


def _loopback_only(real_connect):
    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and self.family in (socket.AF_INET, socket.AF_INET6):
            if not (host.startswith("127.") or host in ("localhost", "::1")):
                raise OSError(f"tests must not touch the network (tried {address})")
        return real_connect(self, address)
    return connect


socket.socket.connect = _loopback_only(socket.socket.connect)  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models on 2 cores: one torch thread avoids OpenMP spin-waiting against the app server,
    subprocesses and pytest itself (10-1000x slower small ops otherwise). SYNTHCXR_TEST_THREADS overrides."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SYNTHCXR_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    """Keep torch/HF/synthcxr caches out of the user's home."""
    base = tmp_path_factory.mktemp("caches")
    os.environ["TORCH_HOME"] = str(base / "torch")
    os.environ["SYNTHCXR_CACHE"] = str(base / "synthcxr")
    os.environ["MPLCONFIGDIR"] = str(base / "mpl")
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny SD-2 pipeline saved with save_pretrained, loadable like a hub model."""
    from cxrcommon.tiny import save_tiny_pipeline
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_inpaint_dir(tmp_path_factory) -> Path:
    from cxrcommon.tiny import save_tiny_pipeline
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-inpaint", inpainting=True)


@pytest.fixture()
def tiny_pipe():
    from cxrcommon.tiny import tiny_pipeline
    return tiny_pipeline()


@pytest.fixture(scope="session")
def realcxr() -> Path:
    """The shared real-CXR folder; tests that need it skip cleanly where it is absent."""
    if not (REALCXR / "manifest.csv").is_file():
        pytest.skip(f"{REALCXR} not present")
    return REALCXR
