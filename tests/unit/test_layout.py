"""The library the services run does not depend on experiments or test fixtures.

`rlhf/experiments` (simulated users, eval, the kl-sweep) and `rlhf/testing` (synthetic
rollouts and preferences, random adapters) sit beside the library; nothing the services
import may reach them. The CLI is the one bridge: it imports them inside the commands that
run them, never at module level, so `rlhf up` loads neither."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = ("rlhf.experiments", "rlhf.testing")


def _imports(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, node)] + [(f"{node.module}.{a.name}", node) for a in node.names]
    return found


def _library_files() -> list[Path]:
    files = [
        p
        for p in (ROOT / "rlhf").rglob("*.py")
        if p.relative_to(ROOT / "rlhf").parts[0] not in ("experiments", "testing")
    ]
    return files + list((ROOT / "services").rglob("*.py"))


def test_the_library_and_services_import_no_experiment_or_fixture():
    bad = []
    for path in _library_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        top_level = set(map(id, tree.body))
        for name, node in _imports(tree):
            if not name.startswith(OUTSIDE):
                continue
            if path.name == "cli.py" and path.parent.name == "rlhf" and id(node) not in top_level:
                continue  # a command's own import, run only by that command
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_forbidden_import(tmp_path):
    tree = ast.parse("import os\nfrom rlhf.testing.rollouts import x\n")
    assert [n for n, _ in _imports(tree) if n.startswith(OUTSIDE)] == [
        "rlhf.testing.rollouts",
        "rlhf.testing.rollouts.x",
    ]
