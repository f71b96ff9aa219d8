"""Finding slides in an archive: files, folders (recursive) and manifest CSVs.

A folder holding ``.dcm`` files is one DICOM-WSI slide. Explicitly named files are always taken,
whatever their extension, so a mis-named file gets a clear error instead of vanishing.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu",
                  ".svslide", ".btf", ".tf8", ".qptiff")


class ManifestError(ValueError):
    """A manifest CSV is malformed; the message names the file and the line."""


@dataclass(frozen=True)
class SlideEntry:
    """One slide to process: where it is, the id its outputs are named by, and an optional
    per-slide µm/px from the manifest."""

    path: Path
    slide_id: str
    mpp: float | None = None


def _slide_stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.is_file() or path.suffix else path.name


def _is_dicom_folder(folder: Path) -> bool:
    return any(p.suffix.lower() == ".dcm" for p in folder.iterdir() if p.is_file())


def _walk(folder: Path) -> list[Path]:
    found: list[Path] = []
    if _is_dicom_folder(folder):
        return [folder]
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            # an MRXS data folder sits beside its index file and is not a slide of its own
            if child.with_suffix(".mrxs").exists():
                continue
            found.extend(_walk(child))
        elif child.name.lower().endswith(SLIDE_SUFFIXES):
            found.append(child)
    return found


def _read_manifest(path: Path) -> list[tuple[Path, str | None, float | None]]:
    rows: list[tuple[Path, str | None, float | None]] = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ManifestError(f"{path}: a manifest needs a 'path' column "
                                "(optional: slide_id, mpp)")
        for line, row in enumerate(reader, start=2):
            slide_path = Path(row["path"].strip())
            if not slide_path.is_absolute():
                slide_path = path.parent / slide_path
            mpp_text = (row.get("mpp") or "").strip()
            try:
                mpp = float(mpp_text) if mpp_text else None
            except ValueError as error:
                raise ManifestError(f"{path}, line {line}: mpp {mpp_text!r} is not a number"
                                    ) from error
            rows.append((slide_path, (row.get("slide_id") or "").strip() or None, mpp))
    return rows


def _unique_ids(items: list[tuple[Path, str | None, float | None]]) -> list[SlideEntry]:
    stems = [given or _slide_stem(path) for path, given, _ in items]
    entries = []
    for (path, given, mpp), stem in zip(items, stems, strict=True):
        slide_id = stem
        if given is None and stems.count(stem) > 1:
            slide_id = f"{stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:6]}"
        entries.append(SlideEntry(path=path, slide_id=slide_id, mpp=mpp))
    ids = [e.slide_id for e in entries]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ManifestError(f"slide ids given twice: {', '.join(duplicates)}")
    return entries


def discover_slides(inputs: list[str | Path]) -> list[SlideEntry]:
    """Expand files, folders and manifest CSVs into slide entries (deduplicated by path)."""
    items: list[tuple[Path, str | None, float | None]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            items.extend((p, None, None) for p in _walk(item))
        elif item.suffix.lower() == ".csv":
            items.extend(_read_manifest(item))
        else:
            items.append((item, None, None))
    seen: set[Path] = set()
    unique = []
    for path, given, mpp in items:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((path, given, mpp))
    return _unique_ids(unique)
