"""Mistakes the user can make get exit code 2 and one message naming the file, line or flag, found before the
expensive work: data that is not UTF-8, an empty target, a folder given as a data file, a truncated base model,
an eval results path that is a file, a --data file that is missing, nothing to score, a port out of range."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import REPO_ROOT
from eval.evaluate import main as evaluate
from lora.finetune import main as finetune

GOOD_ROW = '{"context": "Input: shares rose\\nAnswer: ", "target": "positive"}\n'


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("registry")
    recipe = {"base_model": str(tiny_model_dir), "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl"),
              "quant_bits": None, "max_steps": 1, "batch_size": 2, "lora_r": 4, "lora_alpha": 8}
    path = folder / "finetune_configs.json"
    path.write_text(json.dumps({"tiny": recipe}))
    return path


def _finetune_error(registry, tmp_path, capsys, *overrides) -> str:
    out = tmp_path / "out"
    code = finetune(["tiny", "--registry", str(registry), "--output-dir", str(out),
                     *[arg for item in overrides for arg in ("--set", item)]])
    assert code == 2
    assert not out.exists()  # refused before anything was written
    return capsys.readouterr().err


def test_a_byte_that_is_not_utf8_names_file_and_line(registry, tmp_path, capsys):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(GOOD_ROW.encode() + '{"context": "Soci\u00e9t\u00e9", "target": "neutral"}\n'.encode("latin-1"))
    error = _finetune_error(registry, tmp_path, capsys, f"dataset_path={data}")
    assert f"error: {data}:2: byte 0xe9 at column 18 is not UTF-8 (save the file as UTF-8)." in error


def test_an_empty_target_names_file_and_line(registry, tmp_path, capsys):
    data = tmp_path / "empty_target.jsonl"
    data.write_text(GOOD_ROW + "\n" + '{"context": "Input: flat\\nAnswer: ", "target": ""}\n')
    error = _finetune_error(registry, tmp_path, capsys, f"dataset_path={data}")
    assert f'error: {data}:3: "target" is empty (expected the answer text, e.g. "positive").' in error


def test_a_folder_given_as_dataset_path_is_called_a_folder(registry, tmp_path, capsys):
    folder = tmp_path / "train_dir"
    folder.mkdir()
    error = _finetune_error(registry, tmp_path, capsys, f"dataset_path={folder}")
    assert f"error: data file {folder} is a folder, expected a JSONL file" in error
    assert finetune(["tiny", "--registry", str(registry), "--dry-run", "--set", f"dataset_path={folder}"]) == 0
    assert f"note: dataset_path: data file {folder} is a folder, expected a JSONL file" in capsys.readouterr().err


def test_a_truncated_base_model_names_its_weights_file(registry, tiny_model_dir, tmp_path, capsys):
    base = tmp_path / "truncated_base"
    shutil.copytree(tiny_model_dir, base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code = evaluate(["--base-model", str(base), "--tasks", "sentiment", "--limit", "2", "--no-progress",
                     "--out", str(tmp_path / "results")])
    assert code == 2
    error = capsys.readouterr().err
    assert f"cannot load model weights from {base}: {weights} is damaged: model.safetensors is truncated" in error


def test_eval_out_naming_a_file_is_refused_before_scoring(tiny_model_dir, tmp_path, capsys):
    taken = tmp_path / "results.txt"
    taken.write_text("my notes")
    code = evaluate(["--base-model", str(tiny_model_dir), "--tasks", "sentiment", "--limit", "2", "--no-progress",
                     "--out", str(taken)])
    assert code == 2
    captured = capsys.readouterr()
    assert f"error: results folder {taken} is a file" in captured.err
    assert "Pass --out pointing at a folder" in captured.err
    assert "| task |" not in captured.out  # nothing was scored
    assert taken.read_text() == "my notes"


def test_eval_data_file_that_is_missing_is_an_error_not_a_skip(tiny_model_dir, tmp_path, capsys):
    missing = tmp_path / "my_test.jsonl"
    code = evaluate(["--base-model", str(tiny_model_dir), "--tasks", "sentiment", "--data", f"sentiment={missing}",
                     "--no-progress", "--out", str(tmp_path / "results")])
    assert code == 2
    assert f"error: --data sentiment={missing}: data file {missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_eval_with_nothing_to_score_does_not_exit_0(tiny_model_dir, tmp_path, capsys):
    tasks = json.loads((REPO_ROOT / "eval/tasks.json").read_text())
    tasks["tasks"] = {"sentiment": {**tasks["tasks"]["sentiment"], "path": str(tmp_path / "not_downloaded.jsonl")}}
    tasks["suites"] = {"mine": ["sentiment"]}
    registry = tmp_path / "tasks.json"
    registry.write_text(json.dumps(tasks))
    code = evaluate(["--base-model", str(tiny_model_dir), "--suite", "mine", "--task-registry", str(registry),
                     "--no-progress", "--out", str(tmp_path / "results")])
    assert code == 2
    assert "error: nothing to score: no data here for sentiment" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["99999", "0", "-1", "http"])
def test_serve_port_out_of_range_is_an_argparse_error(port, capsys):
    from lora.serve import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--port", port])
    assert exit_info.value.code == 2
    assert f"argument --port: '{port}' is not a TCP port; expected a whole number from 1 to 65535" in \
        capsys.readouterr().err
    assert build_parser().parse_args(["--port", "65535"]).port == 65535
