"""Two ways another tool changes the base behind the user's back, guarded on our side (see bench/peer_axolotl.py).

1. A tokenizer without a pad token: a tool that adds one grows the vocabulary, the saved adapter then carries the
   embeddings and no longer loads onto the plain base. The runner pads with EOS, or refuses when there is none.
2. A quantised recipe whose base loads unquantised: the loaded layers are counted, a mismatch is an error, and the
   run record says what the base held.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedTokenizerFast

from conftest import REPO_ROOT
from lora.core.errors import ModelSourceError
from lora.finetune import harness_scoring, main
from lora.models.loading import load_base_model
from lora.models.quantisation import QuantisationSettings, count_quantised_layers
from lora.recipes.registry import resolve_recipe
from lora.training.run import run_recipe
from tiny_model import build_tiny_llama, build_tiny_tokenizer

LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FOUR_BIT = QuantisationSettings(bits=4, quant_type="nf4", double_quant=False, compute_dtype="float32")


def _model_folder(folder, *, eos: bool):
    """The tiny Llama with a tokenizer that has no pad token (and no EOS either when `eos` is False)."""
    full = build_tiny_tokenizer()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=full.backend_tokenizer, eos_token="</s>" if eos else None)
    tokenizer.chat_template = full.chat_template
    assert tokenizer.pad_token is None
    build_tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, len(tokenizer)


def _registry(folder, model_dir):
    recipe = {
        "base_model": str(model_dir), "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl"),
        "max_train_examples": 32, "max_steps": 4, "batch_size": 8, "learning_rate": 0.01, "lora_r": 4,
        "lora_alpha": 8, "lora_dropout": 0.0, "logging_steps": 1, "warmup_steps": 0, "max_seq_length": 96,
        "quant_bits": 4, "bnb_4bit_compute_dtype": "float32", "use_dora": True,
    }
    path = folder / "finetune_configs.json"
    path.write_text(json.dumps({"tiny_no_pad": recipe}))
    return path


def test_a_tokenizer_without_pad_token_never_grows_the_vocabulary(tmp_path):
    model_dir, vocab = _model_folder(tmp_path / "model", eos=True)
    out = tmp_path / "run"
    result = run_recipe(resolve_recipe("tiny_no_pad", _registry(tmp_path, model_dir)), out, scoring=harness_scoring())

    assert result.tokenizer.pad_token == "</s>" and len(result.tokenizer) == vocab
    assert result.model.get_input_embeddings().num_embeddings == vocab
    assert result.model.get_output_embeddings().out_features == vocab
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora_" in name for name in saved), [n for n in saved if "lora_" not in n]
    # The adapter loads onto the plain (unquantised) base with stock peft, strictly: nothing missing, nothing extra.
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    PeftModel.from_pretrained(base, out, is_trainable=False)
    assert base.get_input_embeddings().num_embeddings == vocab
    # The run record says the 4-bit recipe got a 4-bit base: every block linear quantised, only the head plain.
    layers = json.loads((out / "run_summary.json").read_text())["base_layers"]
    assert layers == {"bits": 4, "linear4bit": 2 * len(LINEAR_NAMES), "linear8bit": 0, "plain_linear": 1,
                      "quant_type": "nf4"}


def test_a_tokenizer_without_pad_nor_eos_token_is_refused_with_exit_2(tmp_path, capsys):
    model_dir, _ = _model_folder(tmp_path / "model", eos=False)
    code = main(["tiny_no_pad", "--registry", str(_registry(tmp_path, model_dir)), "--output-dir",
                 str(tmp_path / "run")])
    assert code == 2
    message = capsys.readouterr().err
    assert "neither a pad token nor an EOS token" in message and str(model_dir / "tokenizer_config.json") in message


def test_quantised_layers_are_counted_on_the_loaded_modules(tiny_model_dir):
    four = count_quantised_layers(load_base_model(str(tiny_model_dir), FOUR_BIT))
    assert four == {"bits": 4, "linear4bit": 14, "linear8bit": 0, "plain_linear": 1, "quant_type": "nf4"}
    eight = count_quantised_layers(load_base_model(str(tiny_model_dir), QuantisationSettings(bits=8)))
    assert (eight["bits"], eight["linear8bit"], eight["linear4bit"], eight["quant_type"]) == (8, 14, 0, None)
    plain = count_quantised_layers(load_base_model(str(tiny_model_dir), QuantisationSettings.unquantised()))
    assert plain == {"bits": None, "linear4bit": 0, "linear8bit": 0, "plain_linear": 15, "quant_type": None}


def test_the_peer_benchmark_probe_counts_with_the_runners_rule(tiny_model_dir):
    """bench/peer_axolotl.py's probe runs in both tools' Trainers and counts the layers the model really holds."""
    spec = importlib.util.spec_from_file_location("peer_axolotl", REPO_ROOT / "bench" / "peer_axolotl.py")
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    model = load_base_model(str(tiny_model_dir), FOUR_BIT)
    probe = peer.probe_callback()
    probe.on_train_begin(None, None, None, model=model)
    assert probe.record["layers"] == count_quantised_layers(model)
    assert probe.record["layers"]["linear4bit"] == 14


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantised_request_that_loads_unquantised_is_an_error(tiny_model_dir, bits, monkeypatch):
    # transformers skips the layers named in llm_int8_skip_modules without a word: here, every one of them.
    skip_all = [*LINEAR_NAMES, "lm_head"]
    config = (BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=skip_all) if bits == 4
              else BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_all))
    with pytest.raises(ModelSourceError, match=f"asked for a {bits}-bit base but the loaded model has 0 4-bit, "
                                               f"0 8-bit and 15 unquantised linear layers"):
        monkeypatch.setattr(QuantisationSettings, "bitsandbytes_config", lambda self: config)
        load_base_model(str(tiny_model_dir), QuantisationSettings(bits=bits))
