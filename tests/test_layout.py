"""The layering of DESIGN: reward sources never import the RL consumers, and no module imports in a circle."""

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



def test_each_paper_has_its_recipe_file():
    assert {p.stem for p in (PACKAGE / "recipes").glob("*.py")} >= {"tppo", "fg", "ser", "rlgf", "pgg"}
