"""Fetch the public test files of FinLoRA's benchmarks (and FiNER-ORD) on a machine with network access.

    python data/download.py --list                 # tasks with a source, and whether their file is here
    python data/download.py                        # every missing file
    python data/download.py fpb tfns --force       # these tasks, replacing what is there
    python data/download.py --suite finlora_sentiment

Files land where eval/tasks.json expects them (data/test/finlora/), each checked to be FinLoRA-format JSONL
({"context", "target"} rows) before it replaces anything; data/test/finlora/SOURCES.json records URL, sha256 and
row count. FinLoRA's files come from its GitHub repository (git-lfs pointers are followed); FiNER-ORD comes from
the Hugging Face hub (gtfintechlab/finer-ord, token-level BIO tags) and is turned into one row per sentence in the
bundled entities format ('Name, TYPE; Name, TYPE' or 'none'). Offline, this exits with code 2 and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.harness.tasks import expand_task_names, load_tasks  # noqa: E402
from lora.core.errors import UserError, exit_on_user_error  # noqa: E402
from lora.prompts.rows import file_sha256, load_rows  # noqa: E402

TIMEOUT_S = 30
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
RAW_PREFIX = "https://raw.githubusercontent.com/"
LFS_MEDIA_PREFIX = "https://media.githubusercontent.com/media/"
MANIFEST_NAME = "SOURCES.json"
# gold_label ids of gtfintechlab/finer-ord (its dataset card): 0 O, then B/I pairs per type.
FINER_ORD_LABELS = {
    1: ("B", "PER"), 2: ("I", "PER"), 3: ("B", "LOC"), 4: ("I", "LOC"), 5: ("B", "ORG"), 6: ("I", "ORG"),
}
# The bundled entities task's instruction, so that an adapter trained on data/train/entities_train.jsonl is
# scored on FiNER-ORD with the prompt it learnt.
ENTITY_INSTRUCTION = (
    "Instruction: Extract the named entities (organisations, persons, locations) from the sentence. Answer with "
    "'entity, type' pairs separated by '; ' in order of appearance, types ORG, PER, LOC; answer 'none' if there "
    "are none.\nInput: {sentence}\nAnswer: "
)


class DownloadError(UserError):
    """A file could not be fetched or is not what the task expects."""


def fetch(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "lora-recipes-data-download"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        raise DownloadError(f"{url}: HTTP {error.code} {error.reason}.") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(
            f"cannot reach {url} ({reason}). This machine looks offline: run data/download.py on a machine with "
            "network access and copy data/test/finlora/ here, or point a task at a local file with "
            "python eval/evaluate.py --data TASK=PATH."
        ) from None


def fetch_github_file(url: str) -> bytes:
    """A raw GitHub file, following a git-lfs pointer to the media server when the repository stores it in LFS."""
    content = fetch(url)
    if content.startswith(LFS_POINTER_PREFIX) and url.startswith(RAW_PREFIX):
        content = fetch(LFS_MEDIA_PREFIX + url[len(RAW_PREFIX) :])
    return content


def finer_ord_rows(split: str) -> list[dict]:
    """FiNER-ORD's token rows grouped into sentences -> FinLoRA rows in the bundled entities format."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DownloadError("FiNER-ORD comes from the Hugging Face hub, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set.")
    from datasets import load_dataset

    try:
        table = load_dataset("gtfintechlab/finer-ord", split=split)
    except Exception as error:  # datasets raises many types for "no network"; all mean the same here
        raise DownloadError(f"cannot load gtfintechlab/finer-ord ({split}) from the hub: {error}") from None
    sentences: dict[tuple[int, int], list[tuple[str, int]]] = {}
    for token in table:
        key = (int(token["doc_idx"]), int(token["sent_idx"]))
        sentences.setdefault(key, []).append((str(token["gold_token"]), int(token["gold_label"])))
    return [sentence_row(tokens) for _, tokens in sorted(sentences.items())]


def sentence_row(tokens: list[tuple[str, int]]) -> dict:
    """One sentence of (token, label id) -> {"context", "target"}; an I tag without its B starts an entity."""
    entities: list[list] = []  # [words, type]
    previous_type = None
    for word, label in tokens:
        tag, entity_type = FINER_ORD_LABELS.get(label, ("O", None))
        if tag == "I" and entity_type == previous_type and entities:
            entities[-1][0].append(word)
        elif entity_type is not None:
            entities.append([[word], entity_type])
        previous_type = entity_type
    sentence = " ".join(word for word, _ in tokens)
    target = "; ".join(f"{' '.join(words)}, {entity_type}" for words, entity_type in entities) or "none"
    return {"context": ENTITY_INSTRUCTION.format(sentence=sentence), "target": target}


def download_task(task) -> tuple[bytes, dict]:
    source = task.source
    if "url" in source:
        return fetch_github_file(source["url"]), {"url": source["url"]}
    rows = finer_ord_rows(source["split"]) if source["hub_dataset"] == "gtfintechlab/finer-ord" else None
    if rows is None:
        raise DownloadError(f'task "{task.name}": no converter for hub dataset {source["hub_dataset"]}.')
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return text.encode("utf-8"), {"hub_dataset": source["hub_dataset"], "split": source["split"]}


def install(task, content: bytes, origin: dict) -> dict:
    """Check the rows, then move the file into place atomically; returns its manifest entry."""
    task.path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{task.path.name}.", dir=task.path.parent)
    with os.fdopen(handle, "wb") as file:
        file.write(content)
    try:
        rows = load_rows(temporary)
    except UserError as error:
        os.unlink(temporary)
        raise DownloadError(f'task "{task.name}": the downloaded file is not FinLoRA-format JSONL ({error})') from None
    os.replace(temporary, task.path)
    return {**origin, "file": task.path.name, "rows": len(rows), "sha256": file_sha256(task.path),
            "downloaded": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def update_manifest(folder: Path, entries: dict[str, dict]) -> None:
    manifest = folder / MANIFEST_NAME
    current = json.loads(manifest.read_text()) if manifest.is_file() else {}
    current.update(entries)
    manifest.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python data/download.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("tasks", nargs="*", help="task names (default: every task with a source)")
    parser.add_argument("--suite", action="append", default=[], help="a suite from eval/tasks.json")
    parser.add_argument("--force", action="store_true", help="download again even when the file exists")
    parser.add_argument("--list", action="store_true", help="list downloadable tasks and exit")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tasks = load_tasks()
    downloadable = {name: task for name, task in tasks.items() if task.source}
    if args.list:
        for name, task in downloadable.items():
            where = task.source.get("url") or f"hub {task.source['hub_dataset']} ({task.source['split']})"
            print(f"{name:<18} {'here' if task.path.is_file() else 'missing':<8} {where}")
        return 0
    names = expand_task_names(args.tasks, args.suite) if (args.tasks or args.suite) else list(downloadable)
    without_source = [name for name in names if name not in downloadable]
    if without_source:
        raise DownloadError(f"no download source for {', '.join(without_source)} (bundled data ships with the repo).")
    wanted = [downloadable[name] for name in names if args.force or not downloadable[name].path.is_file()]
    if not wanted:
        print("every requested test file is already here (use --force to fetch again).")
        return 0
    entries, failures = {}, []
    for task in wanted:
        try:
            content, origin = download_task(task)
            entries[task.name] = install(task, content, origin)
            print(f"{task.name}: {entries[task.name]['rows']} rows -> {task.path}")
        except DownloadError as error:
            failures.append(f"{task.name}: {error}")
            if "looks offline" in str(error):
                break  # every other URL would fail the same way
    if entries:
        update_manifest(wanted[0].path.parent, entries)
    if failures:
        skipped = len(wanted) - len(entries) - len(failures)
        more = f" ({skipped} more not tried)" if skipped else ""
        raise DownloadError("some test files could not be fetched" + more + ":\n  " + "\n  ".join(failures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
