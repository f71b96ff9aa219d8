"""What is in the archive tonight: discovered slide files, deduplicated by content hash.

Hashing reads about 1 MB per slide file (:mod:`wsi.fingerprint`), so it is done once per file
version: the database keeps each path's *signature* (name, size and mtime of every file of the
slide) and a path whose signature is unchanged keeps its hash. New or changed files are hashed
by a few threads. Paths with the same content hash are one slide (a copy or a rename is
processed once; every path is recorded). A slide keeps the id it was first given; a new slide
takes its discovery id (file stem or manifest ``slide_id``), with a short hash suffix when that
id is already another slide's.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from wsi.fingerprint import content_hash, slide_files

from ..discovery import SlideEntry
from .database import PathRow, SlideRow

HASH_THREADS = 8
UNREADABLE_PREFIX = "unreadable-"


@dataclass(frozen=True)
class ArchiveSlide:
    """One distinct slide: its content hash, id, the entry it is processed from (its first
    path), every path it was found at, when its files last changed, and why it cannot be read
    when it cannot (its hash then stands for its path)."""

    slide_hash: str
    entry: SlideEntry
    paths: tuple[str, ...]
    modified: float
    signatures: tuple[str, ...] = ()
    error: str = ""

    @property
    def slide_id(self) -> str:
        """The id the slide's outputs are named by."""
        return self.entry.slide_id


@dataclass
class Inventory:
    """The slides to consider, with counts for the report."""

    slides: list[ArchiveSlide] = field(default_factory=list)
    found: int = 0
    duplicates: int = 0
    filtered_out: int = 0
    hashed: int = 0


@dataclass(frozen=True)
class _Seen:
    entry: SlideEntry
    path: str
    signature: str
    modified: float
    error: str = ""


def _signature(entry: SlideEntry) -> tuple[str, float]:
    """:func:`files_signature` of the slide's files. Raises OSError for a path that is missing,
    unreadable or not a regular file."""
    files = slide_files(entry.path)
    if not files:
        raise OSError(f"{entry.path}: no files found for this slide")
    return files_signature(files)


def files_signature(files: Sequence[Path]) -> tuple[str, float]:
    """A fingerprint of files from their metadata alone (names, sizes, mtimes), and the latest
    mtime. Raises OSError for a file that is missing or not a regular file."""
    parts, latest = [], 0.0
    for file in files:
        info = os.stat(file)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{file}: not a regular file; slides must be files or folders of "
                          "DICOM files")
        parts.append(f"{file.name}:{info.st_size}:{info.st_mtime_ns}")
        latest = max(latest, info.st_mtime)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32], latest


def _matches(entry: SlideEntry, patterns: Sequence[str], known_id: str | None) -> bool:
    names = {str(entry.path), entry.path.name, entry.slide_id, known_id or entry.slide_id}
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns for name in names)


def _hash(seen: _Seen) -> tuple[str, str]:
    try:
        return content_hash(seen.entry.path), ""
    except OSError as error:
        return "", f"{seen.entry.path}: cannot read the slide: {error.strerror or error}"


def take_inventory(entries: Sequence[SlideEntry], known_paths: dict[str, PathRow],
                   known_slides: dict[str, SlideRow], *, only: Sequence[str] = (),
                   since: datetime | None = None) -> Inventory:
    """Hash (where needed), filter and deduplicate the discovered ``entries``.

    ``only``: shell patterns matched against a slide's path, file name and id; ``since``: keep
    slides whose files changed at or after it (naive times are local).
    """
    inventory = Inventory(found=len(entries))
    ids_by_hash = {h: row.slide_id for h, row in known_slides.items()}
    cutoff = since.timestamp() if since is not None else None
    seen: list[_Seen] = []
    for entry in entries:
        path = os.path.abspath(entry.path)
        known = known_paths.get(path)
        known_id = ids_by_hash.get(known.slide_hash) if known else None
        if only and not _matches(entry, only, known_id):
            inventory.filtered_out += 1
            continue
        try:
            signature, modified = _signature(entry)
        except OSError as error:
            seen.append(_Seen(entry, path, "", 0.0, str(error)))
            continue
        if cutoff is not None and modified < cutoff:
            inventory.filtered_out += 1
            continue
        seen.append(_Seen(entry, path, signature, modified))
    to_hash = [s for s in seen if not s.error and (
        s.path not in known_paths or known_paths[s.path].signature != s.signature)]
    with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="slide-hash") as pool:
        hashed = dict(zip((s.path for s in to_hash), pool.map(_hash, to_hash), strict=True))
    inventory.hashed = len(to_hash)
    groups: dict[str, list[_Seen]] = {}
    for item in seen:
        slide_hash, error = hashed.get(item.path) or (
            (known_paths[item.path].slide_hash, "") if not item.error else ("", item.error))
        if error:
            item = replace(item, error=error)
            slide_hash = UNREADABLE_PREFIX + hashlib.sha256(item.path.encode()).hexdigest()[:16]
        groups.setdefault(slide_hash, []).append(item)
    taken = set(ids_by_hash.values())
    for slide_hash, items in groups.items():
        first = min(items, key=lambda item: (len(item.entry.slide_id), item.path))
        slide_id = ids_by_hash.get(slide_hash) or _free_id(first.entry.slide_id, slide_hash,
                                                           taken)
        taken.add(slide_id)
        mpp = next((i.entry.mpp for i in items if i.entry.mpp is not None), None)
        inventory.duplicates += len(items) - 1
        inventory.slides.append(ArchiveSlide(
            slide_hash=slide_hash,
            entry=SlideEntry(path=Path(first.path), slide_id=slide_id, mpp=mpp),
            paths=tuple(i.path for i in items), modified=max(i.modified for i in items),
            signatures=tuple(i.signature for i in items), error=first.error))
    return inventory


def _free_id(wanted: str, slide_hash: str, taken: set[str]) -> str:
    """``wanted``, or ``wanted-<hash digits>`` when another slide has it."""
    if wanted not in taken:
        return wanted
    digits = slide_hash.split("-")[-1]
    for length in range(8, len(digits) + 1, 4):
        candidate = f"{wanted}-{digits[:length]}"
        if candidate not in taken:
            return candidate
    return f"{wanted}-{digits}"
