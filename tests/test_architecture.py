"""The tree is the architecture: commands on top, library parts below them in one fixed order, no cycles.

Every import of every module under lora/ and eval/ is read with ast (function-local imports included: a lazy import
is still an arrow). The order below is the one README.md's "Architecture" section shows; a part may import itself
(without cycles) and the parts before it, never one after it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module directly in lora/ or eval/ is a command (it has a __main__ block) and may import any part.
PART_ORDER = (
    "lora.core",  # errors, files, provenance, the compute-dtype rule
    "lora.prompts",  # data rows, prompt templates and encoding, answer parsing, rewards, generation
    "lora.recipes",  # the registry, its schema, where a recipe's outputs live
    "lora.models",  # model sources, quantisation settings, loading, memory estimates
    "lora.adapters",  # adapter folders, attaching, fast DoRA, inference loading, merge, normalise, convert
    "lora.training",  # SFT and GRPO trainers, run folders, run record, model card, trackers
    "lora.serving",  # the multi-adapter server's host, batcher, guards and app
    "eval.harness",  # tasks, choice scoring, metrics, the harness, lm-eval export
    "lora.sweeps",  # sweeps as data, their Optuna study and workers, results (objective: a harness task metric)
)
COMMAND_PACKAGES = ("lora", "eval")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in COMMAND_PACKAGES for path in (REPO_ROOT / package).rglob("*.py")}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports: `from a.b import c` counts a.b.c when that is a module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
    return {name for name in found if name in known}


def part_of(module: str) -> str | None:
    """The library part a module belongs to; None for a command (or a top-level package's __init__)."""
    for part in PART_ORDER:
        if module == part or module.startswith(part + "."):
            return part
    return None


def is_command(module: str, path: Path) -> bool:
    return module.count(".") == 1 and part_of(module) is None and path.name != "__init__.py"


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_library_module_belongs_to_a_part_and_every_file_at_the_top_is_a_command():
    strays = []
    for name, path in project_modules().items():
        top_level = name.count(".") == 1
        if top_level and path.name != "__init__.py":
            if "__main__" not in path.read_text(encoding="utf-8"):
                strays.append(f"{name}: directly in {name.split('.')[0]}/ but not a command (no __main__)")
        elif not top_level and name not in COMMAND_PACKAGES and part_of(name) is None:
            strays.append(f"{name}: in no part of PART_ORDER")
    assert not strays, "\n".join(strays)


def test_the_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_flow_one_way_commands_then_parts_in_order():
    modules = project_modules()
    against = []
    for name, targets in import_graph().items():
        if is_command(name, modules[name]):
            against += [f"{name} -> {t} (a command imports another command)" for t in targets
                        if is_command(t, modules[t])]
            continue
        source_part = part_of(name)
        rank = PART_ORDER.index(source_part) if source_part else -1
        for target in sorted(targets):
            target_part = part_of(target)
            if target_part is None:
                if target not in COMMAND_PACKAGES:
                    against.append(f"{name} -> {target} (the library imports a command)")
            elif PART_ORDER.index(target_part) > rank:
                against.append(f"{name} -> {target} ({source_part} is below {target_part})")
    assert not against, "imports against the order:\n" + "\n".join(against)


def test_the_library_leaves_sys_path_alone():
    editing = [name for name, path in project_modules().items()
               if part_of(name) and "sys.path" in path.read_text(encoding="utf-8")]
    assert not editing, f"library modules that edit sys.path: {editing}"


def test_each_part_lists_its_public_names_and_tests_import_only_those():
    modules = project_modules()
    missing = [name for name, path in modules.items()
               if part_of(name) and path.name != "__init__.py"
               and "__all__" not in path.read_text(encoding="utf-8")]
    assert not missing, f"library modules without __all__: {missing}"
    private = []
    for test_file in sorted((REPO_ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(test_file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                path = modules[node.module]
                # a library module's public names are its __all__; a command's, whatever is not underscored
                public = public_names(path) if part_of(node.module) else None
                private += [f"{test_file.name}: {node.module}.{alias.name}" for alias in node.names
                            if f"{node.module}.{alias.name}" not in modules
                            and (alias.name not in public if public is not None else alias.name.startswith("_"))]
    assert not private, "tests import names their module does not list in __all__:\n" + "\n".join(private)


def public_names(path: Path) -> set[str]:
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def test_readme_shows_the_same_order():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Architecture", 1)[-1].split("\n## ", 1)[0]
    order_line = next((line for line in section.splitlines() if line.startswith("Import order:")), "")
    shown = [token.strip(" `.") for token in order_line.removeprefix("Import order:").split("->")]
    assert shown[:-1] == list(PART_ORDER) and shown[-1] == "commands", order_line


def test_paths_the_documents_name_exist():
    """A moved module leaves no dead link or stale path in README.md, BENCHMARKS.md or data/README.md."""
    link = re.compile(r"\]\(([^)#\s]+)")
    quoted_path = re.compile(r"`((?:lora|eval|bench|tests|data|\.ci)/[\w/.-]+\.(?:py|json|jsonl|md|sh|yaml))`")
    missing = []
    for document in ("README.md", "BENCHMARKS.md", "data/README.md"):
        text = (REPO_ROOT / document).read_text(encoding="utf-8")
        base = (REPO_ROOT / document).parent
        for target in link.findall(text):
            if "://" not in target and not (base / target).exists():
                missing.append(f"{document}: link {target}")
        for target in quoted_path.findall(text):
            if not (REPO_ROOT / target).exists():
                missing.append(f"{document}: path {target}")
    assert missing == []
