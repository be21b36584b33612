"""The runner on CUDA (issue 15, section 3): skipped without a CUDA device, run by bench/gpu_check.sh on a GPU.

    python3 -m pytest -m gpu tests/test_gpu.py -q      # on a machine with CUDA and bitsandbytes

4-bit (bf16 compute) and 8-bit LoRA/DoRA training steps through the runner on a tiny local model, fast vs stock
DoRA within bf16 tolerance, reload with identical logits, the merge self-check, choice vs generate scoring, and
a completion from the server.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import REPO_ROOT
from lora.adapters import fast_dora
from lora.finetune import harness_scoring
from lora.models.loading import load_base_model
from lora.models.quantisation import QuantisationSettings
from lora.recipes.registry import resolve_recipe
from lora.training.run import run_recipe

pytestmark = pytest.mark.gpu
ON_CUDA = torch.cuda.is_available()  # False only in the CPU smoke run (GPU_TESTS_ON_CPU=1): device checks skipped

RECIPES = {
    "_tiny_cuda": {
        "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl"),
        "max_train_examples": 48,
        "max_steps": 8,
        "batch_size": 8,
        "learning_rate": 0.01,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "logging_steps": 1,
        "warmup_steps": 0,
        "lr_scheduler_type": "constant",
        "max_seq_length": 96,
    },
    "cuda_lora_4bit": {"extends": "_tiny_cuda", "quant_bits": 4, "bnb_4bit_compute_dtype": "bfloat16"},
    "cuda_dora_4bit": {
        "extends": "_tiny_cuda",
        "quant_bits": 4,
        "bnb_4bit_compute_dtype": "bfloat16",
        "use_dora": True,
    },
    "cuda_lora_8bit": {"extends": "_tiny_cuda", "quant_bits": 8},
    "cuda_dora_8bit": {"extends": "_tiny_cuda", "quant_bits": 8, "use_dora": True},
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    recipes = json.loads(json.dumps(RECIPES))
    recipes["_tiny_cuda"]["base_model"] = str(tiny_model_dir)
    path = tmp_path_factory.mktemp("cuda-registry") / "finetune_configs.json"
    path.write_text(json.dumps(recipes, indent=2))
    return path


@pytest.fixture(scope="module")
def trained(registry, tmp_path_factory):
    """Each recipe trained once on CUDA: name -> (recipe, result, output folder)."""
    out_root = tmp_path_factory.mktemp("cuda-runs")
    runs = {}
    for name in [n for n in RECIPES if not n.startswith("_")]:
        recipe = resolve_recipe(name, registry)
        runs[name] = (recipe, run_recipe(recipe, out_root / name, scoring=harness_scoring()), out_root / name)
    return runs


def prompt_logits(model, tokenizer):
    batch = tokenizer(
        ["Input: Shares rose sharply.\nAnswer: ", "The bank cut its dividend."], return_tensors="pt", padding=True
    ).to(next(model.parameters()).device)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.parametrize("name", [n for n in RECIPES if not n.startswith("_")])
def test_runner_trains_on_cuda_and_the_adapter_reloads_with_identical_logits(trained, name):
    recipe, result, out = trained[name]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert summary["final_loss"] < summary["first_loss"]
    assert next(result.model.parameters()).is_cuda or not ON_CUDA
    base = load_base_model(
        recipe["base_model"], QuantisationSettings.from_recipe(recipe))
    reloaded = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(
        prompt_logits(reloaded, result.tokenizer), prompt_logits(result.model, result.tokenizer), rtol=1e-5, atol=1e-5
    )


def dora_on_cuda(model_dir, base: str, fast: bool, dropout: float = 0.0):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = None
    if base == "nf4-bf16":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, quantization_config=quantization, device_map={"": 0} if ON_CUDA else None
    )
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", use_dora=True)
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator).to(parameter))
    if fast:
        assert fast_dora.enable_fast_dora(model) == 14
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("base", ["bf16", "nf4-bf16"])
def test_fast_dora_matches_stock_on_cuda_within_bf16_tolerance(tiny_model_dir, base, dropout):
    """Stock peft rounds W + s·BA and its norm to bf16; fast DoRA accumulates in fp32. The H100 benchmark measured
    ~1e-2 relative between them; asserted with 3x margin. The fused composition runs compiled here; with dropout,
    fast DoRA draws its mask with CUDA's native_dropout, as F.dropout does, so one seed gives both the same masks."""
    input_ids = torch.randint(2, 250, (2, 12), generator=torch.Generator().manual_seed(3))
    input_ids = input_ids.cuda() if ON_CUDA else input_ids
    logits, grads = {}, {}
    for fast in (True, False):
        model = dora_on_cuda(tiny_model_dir, base, fast, dropout)
        model.train()
        torch.manual_seed(4)  # the same dropout masks for both
        output = model(input_ids=input_ids, labels=input_ids)
        output.loss.backward()
        logits[fast] = output.logits.detach().float()
        grads[fast] = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    assert fast_dora._compiled_kernels is not None or not ON_CUDA  # compiled ran, not the eager fallback

    def relative(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    assert relative(logits[True], logits[False]) < 3e-2
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name in grads[False]:
        assert relative(grads[True][name], grads[False][name]) < 8e-2, name


def test_merge_self_check_on_an_adapter_trained_on_cuda(trained, tmp_path):
    from lora.adapters.merge import merge_adapter

    _, _, out = trained["cuda_dora_4bit"]
    record = merge_adapter(out, tmp_path / "merged", dtype="bf16")
    assert record["check"]["max_abs_logit_diff_fp32"] <= 1e-4


def test_choice_and_generate_scoring_agree_on_a_trained_adapter(trained, tmp_path):
    from eval.harness.evaluation import evaluate_tasks

    recipe, result, _ = trained["cuda_dora_4bit"]
    scores = {}
    for mode in ("choice", "generate"):
        scores[mode] = evaluate_tasks(
            result.model,
            result.tokenizer,
            ["sentiment"],
            mode=mode,
            limit=16,
            prompt_template=recipe["prompt_template"],
            out_dir=tmp_path / mode,
            progress=False,
        )["sentiment"]
    choice = [
        json.loads(line) for line in (tmp_path / "choice" / "sentiment.predictions.jsonl").read_text().splitlines()
    ]
    generate = [
        json.loads(line) for line in (tmp_path / "generate" / "sentiment.predictions.jsonl").read_text().splitlines()
    ]
    agreement = sum(c["prediction"] == g["prediction"] for c, g in zip(choice, generate)) / len(choice)
    assert scores["choice"]["n"] == scores["generate"]["n"] == 16
    assert agreement >= 0.75, (agreement, scores)


def test_server_answers_a_completion_on_cuda(trained):
    import httpx
    from fastapi.testclient import TestClient

    from lora.serving.app import create_app, served_quantisation
    from lora.serving.host import build_host

    recipe, _, out = trained["cuda_dora_4bit"]
    host = build_host(str(recipe["base_model"]), quantisation=served_quantisation([("dora", out)], 4, "float32"))
    host.load_adapter("dora", out)
    with TestClient(create_app(host, adapter_root=out.parent, window_ms=5)) as client:
        response = client.post(
            "/v1/completions", json={"model": "dora", "prompt": "Input: Shares rose.\nAnswer: ", "max_tokens": 4}
        )
    assert response.status_code == httpx.codes.OK, response.text
    assert response.json()["usage"]["completion_tokens"] > 0
