"""Short real training runs of the runner on a tiny local Llama: LoRA and DoRA on fp32, 4-bit and 8-bit bases."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from conftest import REPO_ROOT
from lora.finetune import harness_scoring, main
from lora.models.loading import load_base_model
from lora.models.quantisation import QuantisationSettings
from lora.recipes.registry import resolve_recipe
from lora.training.run import run_recipe
from lora.training.run_folder import plot_loss_curve

EXPECTED_FILES = {
    "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "loss_curve.png",
    "recipe.json", "run_summary.json", "tokenizer.json", "tokenizer_config.json", "trainer_state.json",
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("registry")
    recipes = {
        "_tiny": {
            "base_model": str(tiny_model_dir),
            "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl"),
            "max_train_examples": 48, "max_steps": 12, "batch_size": 8, "learning_rate": 0.01,
            "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "logging_steps": 1, "warmup_steps": 0,
            "lr_scheduler_type": "constant", "max_seq_length": 96,
        },
        "tiny_lora_fp32": {"extends": "_tiny", "quant_bits": None},
        "tiny_dora_fp32": {"extends": "_tiny", "quant_bits": None, "use_dora": True},
        "tiny_lora_4bit": {"extends": "_tiny", "quant_bits": 4, "bnb_4bit_compute_dtype": "float32"},
        "tiny_dora_4bit": {"extends": "_tiny", "quant_bits": 4, "use_dora": True, "bnb_4bit_compute_dtype": "float32"},
        "tiny_lora_8bit": {"extends": "_tiny", "quant_bits": 8},
        "tiny_dora_8bit": {"extends": "_tiny", "quant_bits": 8, "use_dora": True},
    }
    path = folder / "finetune_configs.json"
    path.write_text(json.dumps(recipes, indent=2))
    return path


def _logits(model, tokenizer):
    batch = tokenizer(["Input: Shares rose sharply.\nAnswer: ", "The bank cut its dividend."], return_tensors="pt",
                      padding=True)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("name", ["tiny_lora_fp32", "tiny_dora_fp32", "tiny_lora_4bit", "tiny_dora_4bit",
                                  "tiny_lora_8bit", "tiny_dora_8bit"])
def test_training_run_writes_a_reloadable_adapter(registry, tmp_path, name):
    recipe = resolve_recipe(name, registry)
    result = run_recipe(recipe, tmp_path / name, scoring=harness_scoring())
    out = tmp_path / name
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES

    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 12 and summary["world_size"] == 1
    assert summary["final_loss"] < summary["first_loss"]
    assert summary["answer_tokens_seen"] > 0 and summary["tokens_seen"] > summary["answer_tokens_seen"]
    assert summary["dataset_sha256"] and summary["library_versions"]["peft"] == "0.21.2"
    assert json.loads((out / "recipe.json").read_text())["lora_r"] == 4
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is recipe["use_dora"] and config["base_model_name_or_path"] == str(recipe["base_model"])

    # A freshly quantised base + the saved adapter (stock peft, no project code) gives the trained model's logits.
    base = load_base_model(recipe["base_model"], QuantisationSettings.from_recipe(recipe))
    reloaded = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(_logits(reloaded, result.tokenizer), _logits(result.model, result.tokenizer),
                               rtol=1e-5, atol=1e-5)


def test_finished_output_is_not_overwritten_unless_asked(registry, tmp_path):
    out = tmp_path / "run"
    args = ["tiny_lora_fp32", "--registry", str(registry), "--output-dir", str(out), "--set", "max_steps=2"]
    assert main(args) == 0
    first = (out / "adapter_model.safetensors").read_bytes()
    assert main(args) == 2  # refused: OutputError -> exit 2
    assert (out / "adapter_model.safetensors").read_bytes() == first
    assert main(args + ["--overwrite", "--set", "seed=7"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() != first


def test_crash_before_publishing_leaves_no_adapter_that_looks_finished(registry, tmp_path, monkeypatch):
    import lora.training.model_card

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for a kill while the final files are staged

    monkeypatch.setattr(lora.training.model_card, "write_model_card", crash)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(resolve_recipe("tiny_lora_fp32", registry, ["max_steps=2"]), out, scoring=harness_scoring())
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "run_summary.json").read_text())["status"] == "running"
    monkeypatch.undo()
    # Nothing finished and no checkpoints: running again simply starts over and completes.
    run_recipe(resolve_recipe("tiny_lora_fp32", registry, ["max_steps=2"]), out, scoring=harness_scoring())
    assert json.loads((out / "run_summary.json").read_text())["status"] == "completed"


def _cli(*args, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, str(REPO_ROOT / "lora/finetune.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})


def test_cli_missing_dataset_and_bad_row_and_unknown_model_exit_2(registry, tmp_path):
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"context": "a", "target": "b"}\n{"context": "a"}\n')
    cases = [
        (["--set", f"dataset_path={tmp_path / 'missing.jsonl'}"], "missing.jsonl does not exist"),
        (["--set", f"dataset_path={bad_rows}"], f'{bad_rows}:2: missing "target"'),
        (["--set", "base_model=nobody/no-such-model"], "nobody/no-such-model"),
    ]
    for overrides, fragment in cases:
        result = _cli("tiny_lora_fp32", "--registry", str(registry), "--output-dir", str(tmp_path / "o"), *overrides,
                      cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert fragment in result.stderr and "Traceback" not in result.stderr


def test_loss_curve_shows_train_and_validation_loss_against_the_optimizer_step(tmp_path, monkeypatch):
    """loss_curve.png: a 600x350 PNG, the train loss as a line and the validation loss as dots against the optimizer
    step, labelled, titled with the run, faint grid; no figure left open. The figure is read as matplotlib drew it
    (savefig is watched, not replaced)."""
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    from PIL import Image

    drawn, renderers = [], []
    real_savefig = Figure.savefig

    def watched_savefig(figure, *args, **kwargs):
        drawn.append(figure)
        saved = real_savefig(figure, *args, **kwargs)
        renderers.append(figure.canvas.get_renderer())  # the one that drew it, before the figure is closed
        return saved

    monkeypatch.setattr(Figure, "savefig", watched_savefig)
    with matplotlib.rc_context({"figure.dpi": 72}):  # a user's matplotlibrc does not change the image's size
        plot_loss_curve([(1, 2.0), (2, 1.5), (3, 1.2)], [(2, 1.7), (3, 1.4)], tmp_path / "both.png", "demo (tiny)")
        plot_loss_curve([(1, 2.0), (2, 1.5)], [], tmp_path / "train.png", "no validation")
        plot_loss_curve([], [(2, 1.7)], tmp_path / "validation.png", "no train loss")
    assert plt.get_fignums() == []
    with Image.open(tmp_path / "both.png") as image:
        assert (image.format, image.size) == ("PNG", (600, 350))
    lines_of = [figure.axes[0].get_lines() for figure in drawn]
    assert [[line.get_label() for line in lines] for lines in lines_of] == [
        ["train loss", "validation loss"], ["train loss"], ["validation loss"]]
    train, validation = lines_of[0]
    assert (list(train.get_xdata()), list(train.get_ydata())) == ([1, 2, 3], [2.0, 1.5, 1.2])
    assert (list(validation.get_xdata()), list(validation.get_ydata())) == ([2, 3], [1.7, 1.4])
    assert train.get_marker() == "None" and validation.get_marker() == "o"
    axis = drawn[0].axes[0]
    assert (axis.get_xlabel(), axis.get_ylabel()) == ("optimizer step", "loss (answer tokens)")
    assert (axis.get_title(), axis.title.get_fontsize()) == ("demo (tiny)", 9)
    assert [text.get_text() for text in axis.get_legend().get_texts()] == ["train loss", "validation loss"]
    assert all(line.get_visible() and line.get_alpha() == 0.3 for line in axis.get_xgridlines())
    # laid out to fit: no label or title cut off at the image's edges
    renderer = renderers[0]
    labels = [axis.xaxis.label, axis.yaxis.label, axis.title]
    assert all(drawn[0].bbox.contains(*corner) for text in labels
               for corner in text.get_window_extent(renderer).corners()), "a label or the title is cut off"
