"""Markdown tables of every setting (variable, default, meaning), read from the settings classes.

`python -m cluster.settings_table` prints the tables the README's configuration section holds;
a unit test checks that the README names every variable, so the two cannot drift apart.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from cluster.settings import REPO_ROOT

SOURCES: tuple[tuple[str, str, str], ...] = (
    ("gateway/settings.py", "GatewaySettings", "GATEWAY_"),
    ("worker/settings.py", "WorkerSettings", "WORKER_"),
    ("cluster/settings.py", "ClusterSettings", "CLUSTER_"),
)


@dataclass(frozen=True)
class Setting:
    variable: str
    default: str
    meaning: str


def read_settings(path: Path, class_name: str, prefix: str) -> list[Setting]:
    """Each annotated field of `class_name`, with the comment lines right above it."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    node = next(
        item for item in tree.body if isinstance(item, ast.ClassDef) and item.name == class_name
    )
    settings = []
    for statement in node.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        comment: list[str] = []
        index = statement.lineno - 2
        while index >= 0 and lines[index].strip().startswith("#"):
            comment.insert(0, lines[index].strip().lstrip("#").strip())
            index -= 1
        default = _default_text(source, statement.value)
        settings.append(
            Setting(
                variable=prefix + statement.target.id.upper(),
                default=default,
                meaning=" ".join(comment),
            )
        )
    return settings


def _default_text(source: str, value: ast.expr | None) -> str:
    """The default as written: `Field(default=...)` and `default_factory` are unwrapped."""
    if value is None:
        return ""
    if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "Field":
        for keyword in value.keywords:
            if keyword.arg == "default":
                return _source(source, keyword.value)
            if keyword.arg == "default_factory":
                factory = keyword.value
                if isinstance(factory, ast.Lambda):
                    return _source(source, factory.body)
                return "empty" if getattr(factory, "id", "") in ("list", "dict") else ""
    return _source(source, value)


def _source(source: str, node: ast.expr) -> str:
    return " ".join((ast.get_source_segment(source, node) or "").split())


def markdown_table(settings: list[Setting]) -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for setting in settings:
        default = setting.default.replace("|", "\\|") or "—"
        rows.append(f"| `{setting.variable}` | `{default}` | {setting.meaning} |")
    return "\n".join(rows)


def main() -> None:
    for relative, class_name, prefix in SOURCES:
        print(f"#### `{prefix}*` ({relative})\n")
        print(markdown_table(read_settings(REPO_ROOT / relative, class_name, prefix)))
        print()


if __name__ == "__main__":
    main()
