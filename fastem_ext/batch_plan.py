"""What a batch job works on: its inputs (files, folders, globs) as files, each file's content
hash, its output names in ``OUT_DIR`` and its shard.

Output names are flat: ``x.png`` → ``OUT_DIR/x.png`` and ``OUT_DIR/x.kernel.npy``. A name stays
with one content for good: an input keeps the first name an earlier run gave the same bytes,
whether that run succeeded or failed (the manifest says which); a new input takes its stem
unless another content of the job or any record of the manifest has it (compared
case-insensitively), and then ``{stem}-{first 8 hex digits of its SHA-256}``. Inputs with the
same bytes are one image, processed once.
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .manifest import file_sha256

OUTPUT_SUFFIX = ".png"
KERNEL_SUFFIX = ".kernel.npy"


@dataclass(frozen=True)
class BatchItem:
    """path: the input file; sha256: of its bytes (``None`` where it cannot be read, with the
    reason in ``error``); name: the base of its output names in ``OUT_DIR``."""

    path: Path
    sha256: str | None
    name: str
    error: str | None = None

    @property
    def output(self) -> str:
        return self.name + OUTPUT_SUFFIX

    @property
    def kernel(self) -> str:
        return self.name + KERNEL_SUFFIX

    def shard(self, world_size: int) -> int:
        """The rank that processes this input: its content hash mod ``world_size`` (rank 0 for
        an unreadable file)."""
        return 0 if self.sha256 is None else int(self.sha256[:16], 16) % world_size


@functools.cache
def readable_suffixes() -> frozenset[str]:
    """File suffixes Pillow knows: a folder's files with these are the job's inputs."""
    from PIL import Image

    Image.init()
    return frozenset(Image.registered_extensions())


def expand_inputs(specs: Sequence[str | os.PathLike], out_dir: Path) -> list[Path]:
    """Files, folders (their image files, recursively, hidden ones skipped) and glob patterns
    (``*``, ``?``, ``[…]``, ``**``) as a list of distinct files, in the order given (a folder's
    and a pattern's in name order). Files inside ``out_dir`` are skipped in folders and patterns
    and refused when named. A named file is taken whatever its suffix: one that is not an image
    fails on its own in the job."""
    if isinstance(specs, (str, os.PathLike)) or not specs:
        raise ValueError("inputs must be a non-empty list of files, folders or glob patterns")
    out_real = os.path.realpath(out_dir)
    found: dict[str, Path] = {}
    for spec in specs:
        text = os.fspath(spec)
        path = Path(text)
        if path.is_dir():
            files = _folder_images(path, out_real)
            if not files:
                raise ValueError(f"inputs: folder {text} holds no image files")
        elif path.exists():
            if not path.is_file():  # a FIFO or a device would block the hash or the decoder
                raise ValueError(f"inputs: {text} is not a regular file")
            if _inside(path, out_real):
                raise ValueError(f"inputs: {text} is inside the output folder {out_dir}")
            files = [path]
        elif any(char in text for char in "*?["):
            files = _glob_images(text, out_real)
            if not files:
                raise ValueError(f"inputs: {text!r} matches no file")
        else:
            raise ValueError(f"inputs: no such file or folder: {text}")
        for file in files:
            found.setdefault(os.path.realpath(file), file)
    return list(found.values())


def plan_items(paths: list[Path], previous: list[dict]) -> tuple[list[BatchItem],
                                                               dict[Path, Path]]:
    """The job's items (one per distinct content, plus unreadable files) and the duplicates
    (``{input: the input with the same bytes that is processed}``). previous: every manifest
    record, oldest first (``manifest.read_records``)."""
    hashed: dict[str, Path] = {}
    duplicates: dict[Path, Path] = {}
    unreadable: list[BatchItem] = []
    for path in paths:
        try:
            sha = file_sha256(path)
        except OSError as err:
            unreadable.append(BatchItem(path, None, "", f"cannot read {path}: {err.strerror}"))
            continue
        if sha in hashed:
            duplicates[path] = hashed[sha]
        else:
            hashed[sha] = path
    taken, names = _reserved_names(previous)
    for sha, path in hashed.items():
        if sha not in names:
            names[sha] = _free_name(path.stem, sha, taken)
            taken[names[sha].casefold()] = sha
    items = [BatchItem(path, sha, names[sha]) for sha, path in hashed.items()]
    return items + unreadable, duplicates


def _reserved_names(records: list[dict]) -> tuple[dict[str, str], dict[str, str]]:
    """``({casefolded name: the content that first held it}, {content: its first name})`` from
    every record that ever named outputs, ok or failed: a name is never given to another
    content, and a content keeps its first name."""
    taken: dict[str, str] = {}
    names: dict[str, str] = {}
    for record in records:
        sha, output = record["sha256"], record["output"]
        if sha is None or not output:
            continue
        stem = Path(output).stem
        owner = taken.setdefault(stem.casefold(), sha)
        if owner == sha:
            names.setdefault(sha, stem)
    return taken, names


def _free_name(stem: str, sha: str, taken: dict[str, str]) -> str:
    """``stem`` if no other content has it, else the stem with 8, then all 64 hex digits."""
    for name in (stem, f"{stem}-{sha[:8]}", f"{stem}-{sha}"):
        if taken.get(name.casefold(), sha) == sha:
            return name
    raise AssertionError("two contents share a SHA-256")  # pragma: no cover


def _folder_images(folder: Path, out_real: str) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if (not hidden and path.suffix.lower() in readable_suffixes() and path.is_file()
                and not _inside(path, out_real)):
            files.append(path)
    return files


def _glob_images(pattern: str, out_real: str) -> list[Path]:
    files = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        path = Path(match)
        if path.is_dir():
            files.extend(_folder_images(path, out_real))
        elif path.is_file() and not _inside(path, out_real):
            files.append(path)
    return files


def _inside(path: Path, folder_real: str) -> bool:
    real = os.path.realpath(path)
    return os.path.commonpath([real, folder_real]) == folder_real
