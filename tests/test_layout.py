"""jaxchat's layout: the README's table names every folder and command and each folder's modules, every jaxchat/
path the docs and the code name exists, and the folders import each other without a circle and never a command."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxchat"
FOLDERS = sorted(d.name for d in PACKAGE.iterdir() if (d / "__init__.py").exists())
COMMANDS = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def layout_rows() -> dict[str, str]:
    """The README's Layout table: first cell -> row, for the rows naming jaxchat/."""
    section = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    return {row.split(" | ")[0]: row for row in section.splitlines() if row.startswith("| `jaxchat/")}


def test_the_readme_layout_table_names_every_folder_command_and_module():
    rows = layout_rows()
    named = {Path(t).name.removesuffix(".py") for cell in rows for t in re.findall(r"`([^`]+)`", cell)}
    assert named == set(FOLDERS) | set(COMMANDS)
    for folder in FOLDERS:
        row = rows[f"| `jaxchat/{folder}/`"]
        missing = [p.name for p in (PACKAGE / folder).glob("*.py") if p.stem != "__init__" and f"`{p.name}`" not in row]
        assert not missing, f"README's jaxchat/{folder}/ row lacks {missing}"


def test_every_jaxchat_path_named_exists():
    sources = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *PACKAGE.rglob("*.py")]
    named = {m for p in sources for m in re.findall(r"(?<![\w/.])jaxchat/[\w/]+\.py", p.read_text())}
    assert named and not [m for m in sorted(named) if not (ROOT / m).exists()]


def imported(path: Path) -> set[str]:
    """The folders and top-level modules of jaxchat that a module imports (inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "jaxchat":
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("jaxchat."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("jaxchat.")}
    return out


def test_folders_import_each_other_without_a_circle_and_never_a_command():
    edges = {folder: set() for folder in FOLDERS}
    for folder in FOLDERS:
        for path in (PACKAGE / folder).glob("*.py"):
            names = imported(path)
            assert not names & set(COMMANDS), f"{path.relative_to(ROOT)} imports a command: {names & set(COMMANDS)}"
            edges[folder] |= (names & set(FOLDERS)) - {folder}
    done, path = set(), []

    def visit(folder):
        assert folder not in path, f"folders import each other in a circle: {' -> '.join(path + [folder])}"
        if folder not in done:
            path.append(folder)
            for other in sorted(edges[folder]):
                visit(other)
            path.pop()
            done.add(folder)

    for folder in FOLDERS:
        visit(folder)
