"""Shared test set-up: one thread per process, no network, an isolated data cache."""
import os
import sys
from pathlib import Path

# Set before torch / gradio / huggingface_hub are imported anywhere in the test session.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["PYTHONUNBUFFERED"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Token caches go to a per-session temp folder, never the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("nanoforge_cache")
    os.environ["NANOFORGE_CACHE"] = str(cache)
    yield cache


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    return REPO_ROOT / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def tiny_text(shakespeare_path) -> str:
    """The first ~50 kB of tiny Shakespeare: enough for a real (tiny) training run in seconds."""
    return shakespeare_path.read_text(encoding="utf-8")[:50_000]


def subprocess_env(**extra) -> dict:
    """Environment for scripts started by tests: same offline / single-thread settings."""
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    return env
