"""A model's version from its contents: the same files give the same version on every host.

`content_version` digests every file's relative path and bytes (SHA-256), never modification
times or absolute paths, so two copies of a directory agree and any changed byte changes the
version. Files are hashed in parallel threads (hashlib releases the GIL while it hashes):
about 1 GB/s per core, so a 2 GB directory takes a second or two at start-up
(`python -m worker.model_version DIR` measures it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VERSION_LENGTH = 12
MAX_HASH_THREADS = 4


def model_files(root: Path, names: Iterable[str] | None = None) -> list[Path]:
    """The regular files under `root` (or under its entries `names`), sorted, recursively.

    Symbolic links are followed; a missing name raises FileNotFoundError.
    """
    tops = [root] if names is None else [root / name for name in names]
    found: set[Path] = set()
    for top in tops:
        if top.is_file():
            found.add(top)
        elif top.is_dir():
            found.update(path for path in top.rglob("*") if path.is_file())
        else:
            raise FileNotFoundError(f"{top} does not exist")
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def content_version(root: Path, names: Iterable[str] | None = None) -> str:
    """A short hex digest of the files under `root` (see `model_files`): names and bytes."""
    files = model_files(root, names)
    threads = max(1, min(MAX_HASH_THREADS, len(os.sched_getaffinity(0)), len(files)))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        digests = list(pool.map(file_sha256, files))
    combined = hashlib.sha256()
    for path, digest in zip(files, digests, strict=True):
        combined.update(f"{path.relative_to(root).as_posix()}\0{digest}\n".encode())
    return combined.hexdigest()[:VERSION_LENGTH]


def main() -> None:
    parser = argparse.ArgumentParser(description="Print a directory's content version and time.")
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    version = content_version(args.directory)
    elapsed = time.perf_counter() - started
    size = sum(path.stat().st_size for path in model_files(args.directory))
    print(f"{version}  {size / 1e9:.2f} GB in {elapsed:.2f} s ({size / 1e9 / elapsed:.2f} GB/s)")


if __name__ == "__main__":
    main()
