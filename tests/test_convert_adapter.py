"""lora/convert_adapter.py: NVlabs and torchtune DoRA checkpoints become peft adapters with the same logits.

Each test writes a checkpoint in the foreign format from a reference peft DoRA adapter (renaming keys, reshaping
magnitudes, and for torchtune reordering q/k rows into its rotary layout the way torchtune's hf_to_tune does), then
checks the converted adapter's logits against the reference model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_merge import save_random_adapter

from lora.adapters.convert import convert_adapter
from lora.adapters.folders import AdapterError
from lora.convert_adapter import main as convert_main
from tiny_model import build_tiny_tokenizer

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def reference_dora(tiny_model_dir, tmp_path_factory) -> Path:
    return save_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("ref") / "dora", use_dora=True,
                               target_modules=ALL_LINEAR)


@torch.no_grad()
def adapter_logits(base_dir: Path, adapter_dir: Path | None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    ids = build_tiny_tokenizer()("The bank cut its dividend; shares fell 7%", return_tensors="pt").input_ids
    return model(ids).logits


def write_nvlabs_checkpoint(reference: Path, out: Path, **config_changes) -> Path:
    """The reference adapter as NVlabs' code saves it: peft_type DORA, [out, 1] magnitudes, a pickled .bin."""
    out.mkdir(parents=True)
    tensors = {}
    for key, tensor in load_file(str(reference / "adapter_model.safetensors")).items():
        if key.endswith(".lora_magnitude_vector"):
            tensors[key.replace(".lora_magnitude_vector", ".weight_m_wdecomp.weight")] = tensor.reshape(-1, 1)
        else:
            tensors[key] = tensor
    torch.save(tensors, out / "adapter_model.bin")
    peft_config = json.loads((reference / "adapter_config.json").read_text())
    config = {
        "base_model_name_or_path": peft_config["base_model_name_or_path"], "peft_type": "DORA",
        "task_type": "CAUSAL_LM", "inference_mode": True, "r": peft_config["r"],
        "lora_alpha": peft_config["lora_alpha"], "lora_dropout": 0.05, "target_modules": ALL_LINEAR,
        "Wdecompose_target_modules": None, "dora_simple": True, "merge_weights": False, "fan_in_fan_out": False,
        "enable_lora": None, "bias": "none", "modules_to_save": None,
    }
    config.update(config_changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def hf_rows_to_torchtune(tensor: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """torchtune's hf_to_tune row order for q/k (written from its formula, independently of the converter)."""
    trailing = tensor.shape[1:]
    return tensor.reshape(n_heads, 2, head_dim // 2, *trailing).transpose(1, 2).reshape(-1, *trailing)


def torchtune_tensors(reference: Path) -> dict[str, torch.Tensor]:
    """The reference adapter under torchtune's native names and q/k row order (tiny Llama: 4 heads, 2 kv, dim 16)."""
    names = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
             "self_attn.o_proj": "attn.output_proj", "mlp.gate_proj": "mlp.w1", "mlp.down_proj": "mlp.w2",
             "mlp.up_proj": "mlp.w3"}
    parts = {"lora_A.weight": "lora_a.weight", "lora_B.weight": "lora_b.weight", "lora_magnitude_vector": "magnitude"}
    converted = {}
    for key, tensor in load_file(str(reference / "adapter_model.safetensors")).items():
        module, part = next((key[: -len(p) - 1], p) for p in parts if key.endswith("." + p))
        layer, _, hf_name = module[len(PEFT_PREFIX + "model.layers."):].partition(".")
        if part != "lora_A.weight" and hf_name in ("self_attn.q_proj", "self_attn.k_proj"):
            tensor = hf_rows_to_torchtune(tensor, 4 if hf_name.endswith("q_proj") else 2, 16)
        converted[f"layers.{layer}.{names[hf_name]}.{parts[part]}"] = tensor.clone()
    return converted


@torch.no_grad()
def nvlabs_forward_logits(base_dir: Path, checkpoint: Path) -> torch.Tensor:
    """Logits from NVlabs' DoRA Linear forward (dora_simple), written from its formula on the NVlabs tensors:
    g = m / ||W + s·B A||_row, y = W x + (g - 1) ⊙ W x + bias + g ⊙ s·B A x, s = alpha / r."""
    from transformers import AutoModelForCausalLM

    config = json.loads((checkpoint / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = torch.load(checkpoint / "adapter_model.bin", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    for key in [k for k in tensors if k.endswith(".weight_m_wdecomp.weight")]:
        module_name = key[len(PEFT_PREFIX):-len(".weight_m_wdecomp.weight")]
        lora_a = tensors[f"{PEFT_PREFIX}{module_name}.lora_A.weight"]
        lora_b = tensors[f"{PEFT_PREFIX}{module_name}.lora_B.weight"]
        module = model.get_submodule(module_name)
        norm_scale = tensors[key].view(-1) / torch.linalg.norm(module.weight + (lora_b @ lora_a) * scale, dim=1)

        def forward(x, module=module, lora_a=lora_a, lora_b=lora_b, norm_scale=norm_scale):
            base = torch.nn.functional.linear(x, module.weight)
            result = base + (norm_scale - 1) * base
            if module.bias is not None:
                result = result + module.bias
            return result + norm_scale * (x @ lora_a.T @ lora_b.T) * scale

        module.forward = forward
    ids = build_tiny_tokenizer()("The bank cut its dividend; shares fell 7%", return_tensors="pt").input_ids
    return model(ids).logits


def test_nvlabs_checkpoint_converts_to_peft_with_identical_logits(tiny_model_dir, reference_dora, tmp_path):
    source = write_nvlabs_checkpoint(reference_dora, tmp_path / "nvlabs")
    record = convert_adapter("nvlabs", source, tmp_path / "peft", base_model=str(tiny_model_dir), allow_pickle=True)

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    magnitudes = [t for k, t in tensors.items() if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == 14 and all(t.ndim == 1 for t in magnitudes)
    assert record["read_as"].startswith("pickle")

    converted = adapter_logits(tiny_model_dir, tmp_path / "peft")
    expected = adapter_logits(tiny_model_dir, reference_dora)
    nvlabs = nvlabs_forward_logits(tiny_model_dir, source)
    error = float((converted - expected).abs().max())
    nvlabs_error = float((converted - nvlabs).abs().max())
    print(f"\nNVlabs -> peft: max |logit diff| vs reference peft DoRA = {error:.2e}, "
          f"vs NVlabs' own forward formula = {nvlabs_error:.2e}")
    assert error <= 1e-5 and nvlabs_error <= 1e-5
    assert float((adapter_logits(tiny_model_dir, None) - expected).abs().max()) > 1e-3  # the adapter matters


def test_torchtune_checkpoint_converts_with_hf_row_order(tiny_model_dir, reference_dora, tmp_path):
    tensors = torchtune_tensors(reference_dora)
    pickle_dir = tmp_path / "epoch_0"
    pickle_dir.mkdir()
    torch.save(tensors, pickle_dir / "adapter_model.pt")
    (pickle_dir / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"],
         "peft_type": "LORA"}))
    convert_adapter("torchtune", pickle_dir, tmp_path / "peft", base_model=str(tiny_model_dir), allow_pickle=True)
    # The same tensors as safetensors need no --allow-pickle; alpha then comes from the flag.
    save_file(tensors, str(tmp_path / "native.safetensors"))
    convert_adapter("torchtune", tmp_path / "native.safetensors", tmp_path / "peft2", base_model=str(tiny_model_dir),
                    lora_alpha=8)

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and sorted(config["target_modules"]) == sorted(ALL_LINEAR)
    expected = adapter_logits(tiny_model_dir, reference_dora)
    for out in ("peft", "peft2"):
        error = float((adapter_logits(tiny_model_dir, tmp_path / out) - expected).abs().max())
        print(f"\ntorchtune ({out}) -> peft: max |logit diff| vs reference DoRA = {error:.2e}")
        assert error <= 1e-5


def test_pickle_needs_the_flag_and_the_cli_exits_2(reference_dora, tmp_path, capsys):
    source = write_nvlabs_checkpoint(reference_dora, tmp_path / "nvlabs")
    assert convert_main(["--from", "nvlabs", "-i", str(source), "-o", str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err
    assert "pickle" in stderr and "--allow-pickle" in stderr
    assert not (tmp_path / "out").exists()


def test_features_peft_cannot_express_are_refused(reference_dora, tmp_path):
    not_detached = write_nvlabs_checkpoint(reference_dora, tmp_path / "a", dora_simple=False)
    with pytest.raises(AdapterError, match="dora_simple: false"):
        convert_adapter("nvlabs", not_detached, tmp_path / "out-a", allow_pickle=True)

    magnitude_only = write_nvlabs_checkpoint(reference_dora, tmp_path / "b", Wdecompose_target_modules=["up_proj"])
    with pytest.raises(AdapterError, match="Wdecompose_target_modules"):
        convert_adapter("nvlabs", magnitude_only, tmp_path / "out-b", allow_pickle=True)

    # Magnitude-only modules are refused from the tensors too, even when the config does not list them.
    stray = write_nvlabs_checkpoint(reference_dora, tmp_path / "c")
    tensors = torch.load(stray / "adapter_model.bin", weights_only=True)
    tensors[f"{PEFT_PREFIX}lm_head.weight_m_wdecomp.weight"] = torch.ones(512, 1)
    torch.save(tensors, stray / "adapter_model.bin")
    with pytest.raises(AdapterError, match="magnitude-only"):
        convert_adapter("nvlabs", stray, tmp_path / "out-c", allow_pickle=True)
    assert not any(p.name.startswith("out-") for p in tmp_path.iterdir())


def test_torchtune_without_base_model_or_alpha_is_refused(tiny_model_dir, reference_dora, tmp_path):
    save_file(torchtune_tensors(reference_dora), str(tmp_path / "native.safetensors"))
    with pytest.raises(AdapterError, match="--base-model"):
        convert_adapter("torchtune", tmp_path / "native.safetensors", tmp_path / "o1")
    with pytest.raises(AdapterError, match="--lora-alpha"):
        convert_adapter("torchtune", tmp_path / "native.safetensors", tmp_path / "o2", base_model=str(tiny_model_dir))
