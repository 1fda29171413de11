"""The packages' layering: storage at the bottom, sharding beside it, trainer above, bench on top."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
FORBIDDEN = {"storage": ("trainer", "bench"), "sharding": ("trainer", "bench", "storage"), "trainer": ("bench",)}


def imported_packages(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_package_imports_one_above_it():
    wrong = [
        f"{path.relative_to(ROOT)} imports {name}"
        for package, above in FORBIDDEN.items()
        for path in sorted((ROOT / package).rglob("*.py"))
        if "bundled" not in path.parts
        for name in imported_packages(path) & set(above)
    ]
    assert not wrong, "\n".join(wrong)
