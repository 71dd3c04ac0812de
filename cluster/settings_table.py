"""Markdown tables of every setting (variable, default, meaning), read from the settings classes.

`python -m cluster.settings_table` prints the tables the README's configuration section holds;
a unit test checks that the README names every variable, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass
from pathlib import Path

from cluster.settings import REPO_ROOT
from contract.prompt import PROMPT_MAX_S, PROMPT_MIN_S
from contract.requests import DEFAULT_MAX_TEXT_CHARS

SOURCES: tuple[tuple[str, str, str], ...] = (
    ("gateway/settings.py", "GatewaySettings", "GATEWAY_"),
    ("worker/settings.py", "WorkerSettings", "WORKER_"),
    ("cluster/settings.py", "ClusterSettings", "CLUSTER_"),
)


# Defaults written as names in the source, shown as their values.
READABLE_DEFAULTS = {
    "DEFAULT_MAX_TEXT_CHARS": str(DEFAULT_MAX_TEXT_CHARS),
    "PROMPT_MIN_S": str(PROMPT_MIN_S),
    "PROMPT_MAX_S": str(PROMPT_MAX_S),
    'REPO_ROOT / "run"': "./run",
}


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
    text = " ".join((ast.get_source_segment(source, node) or "").split())
    return READABLE_DEFAULTS.get(text, text)


def markdown_table(settings: list[Setting]) -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for setting in settings:
        default = setting.default.replace("|", "\\|") or "—"
        rows.append(f"| `{setting.variable}` | `{default}` | {setting.meaning} |")
    return "\n".join(rows)


START_MARK = "<!-- settings:start -->"
END_MARK = "<!-- settings:end -->"


def all_tables() -> str:
    parts = []
    for relative, class_name, prefix in SOURCES:
        table = markdown_table(read_settings(REPO_ROOT / relative, class_name, prefix))
        parts.append(f"#### `{prefix}*` ({relative})\n\n{table}\n")
    return "\n".join(parts)


def write_into(path: Path) -> None:
    """Replace what lies between the settings marks in `path` with fresh tables."""
    text = path.read_text()
    head, rest = text.split(START_MARK, 1)
    _, tail = rest.split(END_MARK, 1)
    path.write_text(f"{head}{START_MARK}\n{all_tables()}{END_MARK}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", type=Path, help="update the tables inside this Markdown file")
    args = parser.parse_args()
    if args.write:
        write_into(args.write)
    else:
        print(all_tables())


if __name__ == "__main__":
    main()
