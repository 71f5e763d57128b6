"""The batch job's manifest: one JSON line per finished image, in ``OUT_DIR``, so that a rerun
knows what is done.

A process appends to its own file — ``manifest.jsonl`` alone, or ``manifest.rank{R}.jsonl`` under
``torchrun`` — one line per image, flushed and fsynced before the next image starts, so a killed
job loses at most the line being written. ``read_records`` reads every manifest file of the
folder and skips a malformed line (the truncated last line of a killed writer); ``merge`` folds
the rank files into ``manifest.jsonl`` atomically. A record (``dict``) has the keys of
``RECORD_KEYS``: ``input`` (path), ``sha256`` (of the input file's bytes, ``None`` if it could
not be read), ``settings`` (``settings_hash``), ``status`` (``ok`` or ``failed``), ``sigma``
([0, 1] units) and ``sigma_estimated``, ``output`` and ``kernel`` (file names in ``OUT_DIR``;
a failed record has the names planned for it, which stay reserved; ``None`` if unreadable),
``seconds`` (wall time of the image, or of the network calls it shared), ``error`` (the reason
of a failure), ``rank`` and ``finished`` (Unix time, s).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .io import commit_files

MANIFEST = "manifest.jsonl"
RANK_PATTERN = "manifest.rank*.jsonl"
RECORD_KEYS = ("input", "sha256", "settings", "status", "sigma", "sigma_estimated", "output",
               "kernel", "seconds", "error", "rank", "finished")
TEXT_KEYS = ("input", "sha256", "settings", "status", "output", "kernel", "error")  # or None


def rank_manifest(out_dir: Path, rank: int, world_size: int) -> Path:
    """The file a process appends to: ``manifest.jsonl`` without ``torchrun``, else its rank's."""
    return out_dir / (MANIFEST if world_size == 1 else f"manifest.rank{rank}.jsonl")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def settings_hash(settings: dict) -> str:
    """16 hex digits identifying the settings that change an output (canonical JSON)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def append_record(path: Path, record: dict) -> None:
    """Append one record as a line, on disk when this returns (flush + fsync). A file whose last
    line was cut off by a killed writer gets a newline first, so the fragment stays one bad
    line and this record a good one."""
    line = json.dumps({key: record.get(key) for key in RECORD_KEYS}) + "\n"
    with open(path, "a+b") as handle:
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                line = "\n" + line
        handle.write(line.encode())
        handle.flush()
        os.fsync(handle.fileno())


def read_records(out_dir: Path) -> list[dict]:
    """Every well-formed record of ``manifest.jsonl`` and the rank files, oldest first; lines
    that are not a JSON object with the record's keys are skipped."""
    records = []
    for path in manifest_files(out_dir):
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:  # merged away by another process meanwhile
            continue
        for line in text.splitlines():
            record = _parse(line)
            if record is not None:
                records.append(record)
    records.sort(key=lambda record: record["finished"])
    return records


def manifest_files(out_dir: Path) -> list[Path]:
    """``manifest.jsonl`` (if present) and the rank files, in name order."""
    main = out_dir / MANIFEST
    return ([main] if main.is_file() else []) + sorted(out_dir.glob(RANK_PATTERN))


def latest_by_content(records: list[dict]) -> dict[str, dict]:
    """The last record of each input content (``sha256``): the state of that image's outputs."""
    return {record["sha256"]: record for record in records if record["sha256"] is not None}


def merge(out_dir: Path) -> None:
    """Fold the rank files into ``manifest.jsonl`` (written atomically; repeated and malformed
    lines dropped), then delete them. Run by one process once the others have finished;
    stopped at any point, it leaves every record in at least one file."""
    ranks = sorted(out_dir.glob(RANK_PATTERN))
    main = out_dir / MANIFEST
    if not ranks:
        return
    seen, lines = set(), []
    for record in read_records(out_dir):
        line = json.dumps(record)
        if line not in seen:
            seen.add(line)
            lines.append(line + "\n")
    commit_files({main: "".join(lines).encode()})
    for path in ranks:
        path.unlink(missing_ok=True)


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or set(record) != set(RECORD_KEYS):
        return None
    if not isinstance(record["finished"], (int, float)) or isinstance(record["finished"], bool):
        return None
    if any(record[key] is not None and not isinstance(record[key], str) for key in TEXT_KEYS):
        return None  # a hand-edited line: the job reads names and hashes from these
    if record["status"] == "ok" and not (record["output"] and record["kernel"]):
        return None  # a finished image has both files
    return record
