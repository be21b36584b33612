"""lora/normalize_dora.py: normalised magnitudes reproduce DoRA as plain row scaling; our loaders refuse them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_merge import save_random_adapter

from lora.adapters.folders import NORMALISED_CONFIG_KEY, NORMALISED_RECORD, AdapterError, read_adapter_records
from lora.adapters.folders import refuse_if_normalised as refuse
from lora.adapters.merge import merge_adapter
from lora.adapters.normalise import normalize_dora_adapter
from lora.merge import main as merge_main
from lora.normalize_dora import main as normalize_main
from tiny_model import build_tiny_tokenizer

PATTERNS = {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers.1.self_attn.q_proj": 3}}


def peft_reference(base, adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def apply_as_row_scaling(model, normalised_dir: Path, scales: dict[str, float]) -> None:
    """What a runtime does with a normalised adapter: y = m' ⊙ (base(x) - bias + s·x Aᵀ Bᵀ) + bias, nothing else.

    `base(x)` is the module's own output (so a 4-bit base stays 4-bit); `scales` come from the peft reference model,
    not from the tool under test.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(normalised_dir / "adapter_model.safetensors"))
    for name, scale in scales.items():
        prefix = f"base_model.model.{name}"
        lora_a, lora_b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
        magnitude = tensors[f"{prefix}.lora_magnitude_vector"]
        module = model.get_submodule(name)

        def hook(module, inputs, output, lora_a=lora_a, lora_b=lora_b, magnitude=magnitude, scale=scale):
            bias = module.bias if module.bias is not None else 0.0
            lora = (inputs[0] @ lora_a.T @ lora_b.T) * scale
            return magnitude * (output - bias + lora) + bias

        module.register_forward_hook(hook)


def dora_scales(peft_model) -> dict[str, float]:
    prefix = "base_model.model."
    return {
        name[len(prefix):]: module.scaling["default"]
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector
    }


@torch.no_grad()
def logits(model, text: str = "Shares of the bank rose 4% on Tuesday") -> torch.Tensor:
    ids = build_tiny_tokenizer()(text, return_tensors="pt").input_ids
    return model(ids).logits.float()


def test_normalised_magnitudes_reproduce_unmerged_dora_as_row_scaling(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = save_random_adapter(tiny_model_dir, tmp_path / "dora", use_dora=True, use_rslora=True, **PATTERNS)
    code = normalize_main(["-i", str(adapter), "-b", str(tiny_model_dir), "-o", str(tmp_path / "trt")])
    assert code == 0
    out = tmp_path / "trt"

    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()  # noqa: E731
    reference = peft_reference(load(), adapter)
    expected = logits(reference)
    runtime = load()
    apply_as_row_scaling(runtime, out, dora_scales(reference))
    error = float((logits(runtime) - expected).abs().max())
    print(f"\nnormalised DoRA (fp32 W0, rsLoRA + rank/alpha patterns) vs unmerged peft DoRA: max |logit diff| = "
          f"{error:.2e}")
    assert error <= 1e-5

    # Same key names and shapes as the input (the TensorRT-LLM convention), plus the normalised markers.
    from safetensors.torch import load_file

    before = load_file(str(adapter / "adapter_model.safetensors"))
    after = load_file(str(out / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config[NORMALISED_CONFIG_KEY] is True and config["use_dora"] is True
    record = json.loads((out / NORMALISED_RECORD).read_text())
    assert record["w0"]["kind"] == "unquantised"
    assert record["modules"]["model.layers.0.self_attn.v_proj"]["rank"] == 2
    assert record["modules"]["model.layers.1.self_attn.q_proj"]["alpha"] == 3

    # Why our loaders must refuse it: stock peft silently divides by the norm a second time.
    wrongly_loaded = PeftModel.from_pretrained(load(), str(out)).eval()
    assert float((logits(wrongly_loaded) - expected).abs().max()) > 1e-2


def test_nf4_w0_reproduces_dora_on_the_4bit_base_it_was_trained_on(tiny_model_dir, tmp_path):
    from lora.models.loading import load_base_model
    from lora.models.quantisation import QuantisationSettings

    recipe = {"quant_bits": 4, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "dtype": "float32"}
    adapter = save_random_adapter(tiny_model_dir, tmp_path / "qdora", use_dora=True, recipe=recipe)
    nf4 = normalize_dora_adapter(adapter, tmp_path / "trt-nf4", w0="nf4")
    normalize_dora_adapter(adapter, tmp_path / "trt-fp32", w0="unquantised")
    assert nf4["w0"]["quant_type"] == "nf4" and nf4["w0"]["double_quant"] is True

    def load_4bit():
        return load_base_model(str(tiny_model_dir), QuantisationSettings.from_recipe(recipe)).eval()

    reference = peft_reference(load_4bit(), adapter)
    expected = logits(reference)
    errors = {}
    for variant in ("trt-nf4", "trt-fp32"):
        runtime = load_4bit()
        apply_as_row_scaling(runtime, tmp_path / variant, dora_scales(reference))
        errors[variant] = float((logits(runtime) - expected).abs().max())
    print(f"\non the 4-bit base, vs unmerged peft QDoRA: nf4-W0 normalisation {errors['trt-nf4']:.2e}, "
          f"unquantised-W0 normalisation {errors['trt-fp32']:.2e}")
    assert errors["trt-nf4"] <= 1e-4
    assert errors["trt-fp32"] > errors["trt-nf4"]  # the W0 choice is real, so it is recorded


def test_lora_only_adapter_has_nothing_to_normalise(tiny_model_dir, tmp_path):
    adapter = save_random_adapter(tiny_model_dir, tmp_path / "lora", use_dora=False)
    with pytest.raises(AdapterError, match="nothing to normalise"):
        normalize_dora_adapter(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_our_loaders_refuse_a_normalised_adapter(tiny_model_dir, tmp_path, capsys):
    adapter = save_random_adapter(tiny_model_dir, tmp_path / "dora", use_dora=True)
    out = tmp_path / "trt"
    normalize_dora_adapter(adapter, out)
    assert read_adapter_records(out).is_normalised and not read_adapter_records(adapter).is_normalised

    with pytest.raises(AdapterError, match="NORMALISED DoRA adapter"):
        refuse(out)
    with pytest.raises(AdapterError, match="NORMALISED"):
        merge_adapter(out, tmp_path / "merged")
    with pytest.raises(AdapterError, match="NORMALISED"):
        normalize_dora_adapter(out, tmp_path / "twice")

    # Either marker is enough: a copied adapter_config.json without the sidecar, or the sidecar alone.
    config = json.loads((out / "adapter_config.json").read_text())
    del config[NORMALISED_CONFIG_KEY]
    (out / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError):
        refuse(out)

    assert merge_main([str(out), "--out", str(tmp_path / "merged")]) == 2
    assert "NORMALISED DoRA adapter" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
