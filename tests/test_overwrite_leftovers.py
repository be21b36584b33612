"""What a killed `--overwrite` run leaves beside the output folder never reaches the published run.

A run started with --overwrite builds its replacement in a hidden sibling of the output folder and swaps it in at the
end. When such a run is killed, the sibling stays behind, half written. The next --overwrite must publish only what
that new run wrote: none of the killed run's files, none of its checkpoints. Checked through the real entry point
(lora/finetune.py's main) on the tiny local Llama, looking only at folders (behaviour, not the swap's mechanics).
"""

from __future__ import annotations

import json

import pytest

from conftest import REPO_ROOT
from lora.finetune import main


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    path = tmp_path_factory.mktemp("registry") / "finetune_configs.json"
    path.write_text(json.dumps({"tiny": {
        "base_model": str(tiny_model_dir), "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl"),
        "quant_bits": None, "max_train_examples": 16, "max_steps": 2, "batch_size": 4, "learning_rate": 0.01,
        "warmup_steps": 0, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "logging_steps": 1,
        "max_seq_length": 64, "save_steps": 1,
    }}))
    return path


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _leave_a_killed_replacement(out, hidden):
    """The hidden folder as a killed --overwrite leaves it: a run record saying "running", files, checkpoint-99."""
    hidden.mkdir()
    summary = json.loads((out / "run_summary.json").read_text())
    (hidden / "run_summary.json").write_text(json.dumps({**summary, "status": "running"}))
    (hidden / "junk-from-the-killed-run.txt").write_text("half written\n")
    (hidden / "adapter_model.safetensors").write_bytes(b"truncated")
    stale_checkpoint = hidden / "checkpoints" / "checkpoint-99"
    stale_checkpoint.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "trainer_state.json"):
        (stale_checkpoint / name).write_text("{}")


def test_a_killed_overwrites_leftovers_never_reach_the_published_folder(registry, tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["tiny", "--registry", str(registry), "--output-dir", str(out)]) == 0
    fresh_files = _files(out)
    # the replacement's name today; whatever the name, no hidden sibling of the output may be left at the end
    _leave_a_killed_replacement(out, tmp_path / f".{out.name}.overwrite")
    before = {p.name for p in tmp_path.iterdir()}

    assert main(["tiny", "--registry", str(registry), "--output-dir", str(out), "--overwrite", "--set", "seed=7"]) == 0
    capsys.readouterr()

    published = _files(out)
    assert published == fresh_files  # exactly what a run writes: the same names as the first run's folder
    assert "junk-from-the-killed-run.txt" not in published
    assert not any("checkpoint-99" in name for name in published)
    assert json.loads((out / "run_summary.json").read_text())["status"] == "completed"
    assert json.loads((out / "recipe.json").read_text())["seed"] == 7
    # nothing of the killed run is left lying beside it either (its hidden folder included)
    # (the one-writer lock file `.NAME.lock` stays beside every output by design: lora/core/locks.py)
    left_beside = sorted(p.name for p in tmp_path.iterdir() if p.name not in (out.name, f".{out.name}.lock"))
    assert not [name for name in left_beside if name.startswith(f".{out.name}")], left_beside
    assert set(left_beside) <= before - {out.name}

