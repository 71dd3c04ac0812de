"""The README starts with the two commands and documents every setting."""

from __future__ import annotations

import pytest

from cluster.settings import REPO_ROOT
from cluster.settings_table import SOURCES, read_settings

README = (REPO_ROOT / "README.md").read_text()


def test_the_two_commands_come_first() -> None:
    first_block = README.split("```")[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:]]
    assert [command for command in commands if command] == ["make up", "make test"]


@pytest.mark.parametrize(("relative", "class_name", "prefix"), SOURCES)
def test_every_setting_is_documented(relative: str, class_name: str, prefix: str) -> None:
    settings = read_settings(REPO_ROOT / relative, class_name, prefix)
    assert settings
    missing = [s.variable for s in settings if f"`{s.variable}`" not in README]
    assert not missing
    assert all(setting.meaning for setting in settings), "a field without a comment"


def test_every_make_target_in_the_readme_exists() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    for target in ("up", "down", "status", "logs", "test"):
        assert f"make {target}" in README
        assert f"\n{target}:" in makefile
