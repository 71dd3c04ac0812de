"""The Docker images install what their code imports.

The gateway image and the CUDA worker image install explicit requirement lists (no torch in the
gateway; the base image's CUDA torch in the worker), so a new import must reach those lists.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from cluster.settings import REPO_ROOT

# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {
    "pydantic_settings": "pydantic-settings",
    "prometheus_client": "prometheus-client",
    "multipart": "python-multipart",
    "yaml": "pyyaml",
}
# Installed with another requirement (starlette with fastapi), or by the base image.
PROVIDED = {"starlette", "typing_extensions", "torch"}
FIRST_PARTY = {"contract", "gateway", "worker", "cluster"}


def third_party_imports(folders: list[Path], skip: tuple[str, ...] = ()) -> set[str]:
    found: set[str] = set()
    for folder in folders:
        for path in folder.rglob("*.py"):
            if any(part in skip for part in path.relative_to(REPO_ROOT).parts) or (
                path.stem in skip
            ):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                found.update(name.split(".")[0] for name in names)
    return {
        name
        for name in found
        if name not in sys.stdlib_module_names and name not in FIRST_PARTY | PROVIDED
    }


def requirements(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[<>=\[ ]", line, maxsplit=1)[0].lower())
    return names


@pytest.mark.parametrize(
    ("requirements_file", "folders", "skip"),
    [
        ("docker/requirements-gateway.txt", ["gateway", "contract"], ()),
        # The CUDA image runs cosyvoice, not Piper.
        (
            "docker/requirements-worker-cuda.txt",
            ["worker", "contract"],
            ("piper", "piper_noise"),
        ),
    ],
)
def test_image_requirements_cover_the_imports(
    requirements_file: str, folders: list[str], skip: tuple[str, ...]
) -> None:
    needed = third_party_imports([REPO_ROOT / folder for folder in folders], skip)
    listed = requirements(REPO_ROOT / requirements_file)
    missing = sorted(
        name for name in needed if DISTRIBUTIONS.get(name, name).replace("_", "-") not in listed
    )
    assert not missing, f"{requirements_file} lacks {missing}"


def test_dockerfiles_copy_the_requirement_lists() -> None:
    gateway = (REPO_ROOT / "docker/gateway.Dockerfile").read_text()
    cuda = (REPO_ROOT / "docker/worker-cuda.Dockerfile").read_text()
    assert "docker/requirements-gateway.txt" in gateway
    assert "docker/requirements-worker-cuda.txt" in cuda
    assert "torch" not in gateway.split("COPY")[1]
