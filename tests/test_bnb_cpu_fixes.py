"""Regression tests for the two bitsandbytes CPU defects neutralised in lora/models/bnb_cpu_fixes.py.

Each defect gets two tests: one showing the project's loading path is correct, one showing the defect is real
when the neutraliser is bypassed (if bitsandbytes fixes it upstream, that second test fails and tells us the
neutraliser can go).
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora.models import bnb_cpu_fixes
from lora.models.loading import load_base_model
from lora.models.quantisation import QuantisationSettings

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _dora_model(model_dir, quantisation, repack: bool | None = None):
    model = load_base_model(str(model_dir), quantisation)
    if repack is not None:  # what an AVX512-BF16 CPU gets from bitsandbytes without the neutraliser
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = repack
    torch.manual_seed(1)
    config = LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False, use_dora=True)
    return get_peft_model(model, config)


def _train_step_grads(model, input_ids, eval_forward_first: bool):
    if eval_forward_first:
        model.eval()
        with torch.no_grad():
            model(input_ids=input_ids)
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _max_relative_error(grads, reference):
    assert grads.keys() == reference.keys() and reference
    return max(((grads[k] - reference[k]).norm() / reference[k].norm()).item() for k in reference)


FOUR_BIT = QuantisationSettings(bits=4, quant_type="nf4", double_quant=False, compute_dtype="bfloat16")


def test_loaded_4bit_layers_never_repack_their_weights(tiny_model_dir):
    model = load_base_model(str(tiny_model_dir), FOUR_BIT)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)


def test_4bit_gradients_after_an_eval_forward_equal_a_fresh_models(tiny_model_dir):
    input_ids = torch.randint(2, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    fresh = _train_step_grads(_dora_model(tiny_model_dir, FOUR_BIT), input_ids, eval_forward_first=False)
    after_eval = _train_step_grads(_dora_model(tiny_model_dir, FOUR_BIT), input_ids, eval_forward_first=True)
    assert _max_relative_error(after_eval, fresh) == 0.0


def test_4bit_repacking_defect_is_real_without_the_neutraliser(tiny_model_dir):
    """Forced repacking, an eval forward, then a train step: the gradients are broken, in a way that depends on the CPU.

    After the eval forward every Linear4bit holds its weight in bitsandbytes' packed CPU layout and routes the
    training forward through `gemv_4bit`, which has no autograd formula:
    - CPUs with AVX512-BF16 (Intel Xeon with AMX, AMD EPYC Zen 4/5): bitsandbytes registers its fused CPU kernel for
      `gemv_4bit`. Its output is right, but autograd's fallback gives its input no gradient, so nothing flows back
      through a repacked base layer: adapters reached only that way (q_proj/v_proj, whose gradient must pass the
      unadapted o_proj) get NO gradient at all, and the others get wrong ones (their upstream terms are missing).
    - CPUs without AVX512-BF16 (AVX2 only; bitsandbytes repacks there only when forced, as here): `gemv_4bit` is the
      default kernel, which dequantises the packed bytes as if they were unpacked. Gradients flow, but through a
      garbage weight: every adapter weight gets a wrong gradient (~100% relative error).
    Either symptom proves the defect; if neither shows (all gradients present and equal to a fresh model's within
    0.1), bitsandbytes has fixed it and the neutraliser can go.
    """
    input_ids = torch.randint(2, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    fresh = _train_step_grads(_dora_model(tiny_model_dir, FOUR_BIT), input_ids, eval_forward_first=False)
    repacked = _train_step_grads(_dora_model(tiny_model_dir, FOUR_BIT, repack=True), input_ids, eval_forward_first=True)
    assert repacked.keys() <= fresh.keys() and fresh
    missing = sorted(fresh.keys() - repacked.keys())
    present = {key: repacked[key] for key in fresh.keys() & repacked.keys()}
    worst_error = _max_relative_error(present, {key: fresh[key] for key in present}) if present else 0.0
    if bnb.functional.has_avx512bf16():
        assert any(".q_proj." in key for key in missing) and any(".v_proj." in key for key in missing), missing
    assert missing or worst_error > 0.1, f"gradients all present and correct (max relative error {worst_error:.3g})"


def _train_8bit_dora(model_dir, steps: int) -> list[float]:
    model = _dora_model(model_dir, QuantisationSettings(bits=8))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    input_ids = torch.randint(2, 400, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_8bit_dora_trains_several_steps(tiny_model_dir):
    losses = _train_8bit_dora(tiny_model_dir, steps=5)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_8bit_dora_crashes_without_the_neutraliser(tiny_model_dir, monkeypatch):
    patched = bnb.nn.Linear8bitLt.init_8bit_state
    assert getattr(patched, "keeps_scales", False), "lora.models.bnb_cpu_fixes did not patch init_8bit_state"
    monkeypatch.setattr(bnb.nn.Linear8bitLt, "init_8bit_state", patched.__wrapped__)
    with pytest.raises(AttributeError, match="unsqueeze"):
        _train_8bit_dora(tiny_model_dir, steps=3)


def test_apply_is_idempotent():
    before = bnb.nn.Linear8bitLt.init_8bit_state
    bnb_cpu_fixes.apply()
    bnb_cpu_fixes._APPLIED = False
    bnb_cpu_fixes.apply()
    assert bnb.nn.Linear8bitLt.init_8bit_state is before
