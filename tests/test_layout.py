"""The layering of docs/design.md: each module imports only its own package or lower ranks, no private names."""

import ast
from pathlib import Path

import tokencredit

PACKAGE = Path(tokencredit.__file__).parent


def _imports() -> dict[str, set[str]]:
    """Module name -> the tokencredit modules it imports anywhere in its body (lazy imports included)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tokencredit"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("tokencredit")}
        graph[name] = found
    return graph


def test_reward_sources_never_import_the_rl_consumers():
    offenders = {m: sorted(i for i in deps if i.startswith("tokencredit.rl"))
                 for m, deps in _imports().items() if m.startswith("tokencredit.rewards")}
    assert not {m: d for m, d in offenders.items() if d}


def test_the_reward_modules_import_no_circle():
    graph = {m: {d for d in deps if d.startswith("tokencredit.rewards") and d != m}
             for m, deps in _imports().items() if m.startswith("tokencredit.rewards")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])



# docs/design.md's ranks: a module may import its own rank or a lower one, never a higher one.
RANKS = {
    "config": 0, "runs": 0, "run_folders": 0, "record_files": 0, "textbounds": 0, "token_text": 0, "masked": 0,
    "precision": 0, "distributed": 0,
    "models": 1, "generation": 1, "fastdecode": 1, "vllm_rollout": 1, "evaluate": 1, "testing": 1,
    "rewards": 2,
    "feedback": 3, "model_server": 3,
    "rl": 4, "judges": 4, "tasks": 4,
    "recipes": 5,
    "commands": 6, "cli": 6, "serve": 6, "__main__": 6, "": 6,
}


INDEPENDENT = {"rl", "judges", "tasks"}  # same rank, and none imports another


def _part(module: str) -> str:
    """The first name under tokencredit ("" for the package itself)."""
    return module.split(".")[1] if "." in module else ""


def test_the_design_document_the_layout_follows_is_in_the_repo():
    design = PACKAGE.parents[1] / "docs" / "design.md"
    assert design.is_file()
    text = design.read_text()
    assert all(f"`{name}" in text for name in RANKS if name and name != "__main__")


def test_every_module_imports_only_its_own_package_or_lower_ranks():
    graph = _imports()
    assert {_part(m) for m in graph} <= set(RANKS), "a new top-level module needs a rank in docs/design.md"
    offenders = {}
    for module, deps in graph.items():
        own = _part(module)
        bad = sorted(d for d in deps if _part(d) != own and (RANKS[_part(d)] > RANKS[own] or (
            RANKS[_part(d)] == RANKS[own] and {own, _part(d)} <= INDEPENDENT)))
        if bad:
            offenders[module] = bad
    assert not offenders


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tokencredit"):
                offenders += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders


def test_each_paper_has_its_recipe_file():
    assert {p.stem for p in (PACKAGE / "recipes").glob("*.py")} >= {"tppo", "fg", "ser", "rlgf", "pgg"}


def test_no_function_over_100_lines_and_no_module_over_800():
    long_functions, long_modules = [], []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 800:
            long_modules.append(f"{path.name}: {text.count(chr(10))}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                long_functions.append(f"{path.name}:{node.lineno} {node.name}")
    assert not long_functions and not long_modules
