"""The memory estimate: weights and activations checked against real tiny models on this machine, the total against
FinLoRA's published GPU measurements for Llama-3.1-8B-Instruct, and its place in `--dry-run` (stderr, after the
JSON on stdout)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import REPO_ROOT
from lora.adapters.attach import attach_adapter
from lora.models.loading import load_base_model
from lora.models.memory import (
    activation_bytes_per_token,
    base_weight_bytes,
    estimate_memory,
    format_estimate,
    load_model_config,
    model_shape_from_config,
    trainable_parameter_count,
)
from lora.models.quantisation import QuantisationSettings
from lora.recipes.registry import resolve_recipe

# FinLoRA, docs/source/benchmark_results/resources.rst ("GPU Memory Usage for Fine-tuning", Llama-3.1-8B on NER,
# batch 4), github.com/Open-Finance-Lab/FinLoRA: trainable parameters and GPU memory.
FINLORA = {(8, 8): (4.72e6, 11.41e9), (4, 4): (2.36e6, 8.25e9)}
# FinLoRA's training settings (lora/finetune.py there, an axolotl template): LoRA on q/k/v, lora_dropout 0.05,
# gradient checkpointing on, bf16, no sample packing and no padding to sequence_len, so a batch is as long as its
# longest example. Their NER question set has an average prompt length of 138 tokens
# (docs/source/tasks/general_financial_tasks.rst); we take that as the padded length.
FINLORA_SETTINGS = {
    "lora_target_modules": ["q_proj", "k_proj", "v_proj"], "lora_dropout": 0.05, "lora_alpha": 16,
    "gradient_checkpointing": True, "batch_size": 4, "max_seq_length": 138,
}


def _registry(tmp_path, recipes: dict):
    path = tmp_path / "finetune_configs.json"
    path.write_text(json.dumps(recipes, indent=2))
    return path


def _llama_3_1_8b_folder(tmp_path):
    """Llama-3.1-8B's architecture (config only, no weights) as a local model folder."""
    folder = tmp_path / "llama-3.1-8b-config"
    LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009,
    ).save_pretrained(folder)
    return folder


def test_estimate_lands_within_20_percent_of_finlora_measurements(tmp_path):
    folder = _llama_3_1_8b_folder(tmp_path)
    data = str(REPO_ROOT / "data/train/sentiment_train.jsonl")
    registry = _registry(tmp_path, {
        f"llama_{bits}bit_r{rank}": {"base_model": str(folder), "dataset_path": data, "quant_bits": bits,
                                     "lora_r": rank, **FINLORA_SETTINGS,
                                     **({"bnb_4bit_compute_dtype": "bfloat16"} if bits == 4 else {})}
        for bits, rank in FINLORA
    })
    rows = []
    for (bits, rank), (published_trainable, published_bytes) in FINLORA.items():
        recipe = resolve_recipe(f"llama_{bits}bit_r{rank}", registry)
        config, where = load_model_config(recipe)
        assert config is not None and "local folder" in where
        shape = model_shape_from_config(config)
        estimate = estimate_memory(recipe, shape, on_cuda=True)
        # The same adapter as FinLoRA's (their table counts 4.72 M / 2.36 M trainable parameters).
        assert estimate.trainable_parameters == pytest.approx(published_trainable, rel=0.005)
        error = estimate.total / published_bytes - 1
        rows.append(f"{bits}-bit r{rank}: estimate {estimate.total / 1e9:.2f} GB (weights "
                    f"{estimate.base_weights / 1e9:.2f}, activations {estimate.activations / 1e9:.2f}) vs FinLoRA "
                    f"{published_bytes / 1e9:.2f} GB: {error:+.1%}")
        assert abs(error) < 0.20, rows[-1]
        assert estimate.total_other_setting > 1.4 * estimate.total  # without checkpointing activations dominate
    print("\n".join(rows))


def _stored_bytes(model) -> int:
    """Bytes of every parameter, buffer and bitsandbytes quantisation constant the model holds."""
    seen = {}

    def add(tensor):
        if isinstance(tensor, torch.Tensor):
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()

    for tensor in list(model.parameters()) + list(model.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            add(state.absmax)
            if state.nested:
                add(state.state2.absmax)
                add(state.offset)
        add(getattr(tensor, "SCB", None))
    return sum(seen.values())


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    registry = _registry(folder, {"small": {"base_model": str(folder), "lora_r": 8, "batch_size": 2,
                                            "max_seq_length": 64, "lora_dropout": 0.1,
                                            "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl")}})
    return folder, registry


@pytest.mark.parametrize("overrides", [
    ["quant_bits=4", "bnb_4bit_use_double_quant=true"],
    ["quant_bits=4", "bnb_4bit_use_double_quant=false"],
    ["quant_bits=4", 'bnb_4bit_quant_storage="bfloat16"', 'dtype="bfloat16"'],  # the FSDP/ZeRO-3 layout
    ["quant_bits=8"],
    ["quant_bits=null"],
    ["quant_bits=null", 'dtype="bfloat16"'],
])
def test_weight_and_adapter_bytes_match_the_model_the_runner_builds(small_llama, overrides):
    folder, registry = small_llama
    recipe = resolve_recipe("small", registry, overrides + ["use_dora=true"])
    model = load_base_model(str(folder), QuantisationSettings.from_recipe(recipe))
    model = attach_adapter(recipe, model)
    shape = model_shape_from_config(model.base_model.model.config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable_parameter_count(recipe, shape) == trainable
    estimated = base_weight_bytes(recipe, shape) + 4 * trainable
    # The remaining difference is bitsandbytes' per-layer constants (a 256-entry lookup table per 4-bit layer).
    assert estimated == pytest.approx(_stored_bytes(model), rel=0.03)


def _saved_activation_bytes(model, batch) -> int:
    """Bytes of the tensors autograd keeps for backward (parameters excluded: they are counted as weights)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch)
    return sum(saved.values())


def _training_forward_saved_bytes(recipe, folder) -> int:
    model = load_base_model(str(folder), QuantisationSettings.from_recipe(recipe))
    model = attach_adapter(recipe, model)
    model.train()
    tokens = torch.randint(0, 512, (recipe["batch_size"], recipe["max_seq_length"]))
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}
    return _saved_activation_bytes(model, batch)


FP32_4BIT = ["quant_bits=4", 'bnb_4bit_compute_dtype="float32"']


# The small recipe has lora_dropout 0.1; fast DoRA (the default) with and without it.
@pytest.mark.parametrize("overrides", [FP32_4BIT, FP32_4BIT + ["lora_dropout=0"], ["quant_bits=null"],
                                       ["quant_bits=null", "use_dora=true"], FP32_4BIT + ["use_dora=true"],
                                       FP32_4BIT + ["use_dora=true", "lora_dropout=0"]])
def test_activation_bytes_match_what_autograd_keeps(small_llama, overrides):
    folder, registry = small_llama
    recipe = resolve_recipe("small", registry, overrides)
    measured = _training_forward_saved_bytes(recipe, folder)

    shape = model_shape_from_config(load_model_config(recipe)[0])
    per_layer, _, _ = activation_bytes_per_token(recipe, shape, mask_bytes=4)  # peft's CPU dropout keeps float masks
    # Forward only: the loss keeps its log-softmax output (4 bytes x vocab); the gradients that make up the rest of
    # the estimate's 12 bytes x vocab appear in backward. Plus the final norm's float32 input.
    forward_per_token = shape.num_layers * per_layer + 4 * shape.vocab_size + 4 * shape.hidden_size
    expected = recipe["batch_size"] * recipe["max_seq_length"] * forward_per_token
    assert expected == pytest.approx(measured, rel=0.10)


def test_dropout_costs_a_fast_dora_layer_no_more_memory_than_a_lora_layer(small_llama):
    """Dropout's extra saved tensors: peft's LoRA keeps a float mask and a dropped-out input copy per layer; fast
    DoRA keeps a bool mask and one output-sized sum (op by op, DoRA kept both of LoRA's and two outputs more)."""
    folder, registry = small_llama

    def dropout_cost(adapter):
        with_dropout, without = (resolve_recipe("small", registry, FP32_4BIT + [adapter, f"lora_dropout={p}"])
                                 for p in (0.1, 0))
        return _training_forward_saved_bytes(with_dropout, folder) - _training_forward_saved_bytes(without, folder)

    assert 0 < dropout_cost("use_dora=true") <= dropout_cost("use_dora=false")


def _dry_run(*args, cwd):
    return subprocess.run([sys.executable, str(REPO_ROOT / "lora/finetune.py"), *args, "--dry-run"],
                          capture_output=True, text=True, timeout=300, cwd=cwd, env={"HF_HUB_OFFLINE": "1", "PATH": ""})


def test_dry_run_keeps_stdout_json_and_prints_the_estimate_and_warning_on_stderr(small_llama, tmp_path):
    _, registry = small_llama
    # 33 M tokens per step: beyond any device's memory, so the warning shows whatever this machine has.
    result = _dry_run("small", "--registry", str(registry), "--set", "batch_size=4096", "--set",
                      "max_seq_length=8192", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["batch_size"] == 4096  # stdout is the resolved recipe and nothing else
    assert "memory estimate for small per process" in result.stderr and "total" in result.stderr
    assert "WARNING: exceeds" in result.stderr and "lower batch_size" in result.stderr


def test_warning_names_the_setting_that_would_make_it_fit(small_llama):
    _, registry = small_llama
    recipe = resolve_recipe("small", registry, ["quant_bits=8"])
    shape = model_shape_from_config(load_model_config(recipe)[0])
    estimate = estimate_memory(recipe, shape)
    between = (estimate.total + estimate.total_other_setting) / 2  # fits only with gradient checkpointing
    text = format_estimate(recipe, estimate, "a test", ("CUDA device 0 (test)", between))
    assert "WARNING: exceeds CUDA device 0 (test)" in text
    assert "set gradient_checkpointing true" in text and "use quant_bits 4" in text
    roomy = format_estimate(recipe, estimate, "a test", ("CUDA device 0 (test)", 2 * estimate.total))
    assert "WARNING" not in roomy and "fits CUDA device 0 (test)" in roomy


def test_dry_run_of_an_unknown_model_offline_says_so_and_succeeds(tmp_path):
    registry = _registry(tmp_path, {"elsewhere": {"base_model": "nobody/not-cached-anywhere",
                                                  "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl")}})
    result = _dry_run("elsewhere", "--registry", str(registry), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["base_model"] == "nobody/not-cached-anywhere"
    assert 'memory estimate: not available: no config.json for "nobody/not-cached-anywhere"' in result.stderr
