"""A fast, stable content hash of a slide that never reads the whole file.

The hash covers every file that makes up the slide (one TIFF, or an MRXS index plus its data
folder, or the instances of a DICOM-WSI series): for each file its size and fixed-size samples
taken at evenly spaced offsets, including the head (where TIFF/DICOM headers and metadata live)
and the tail. It depends only on the bytes, so it is the same whichever backend opens the slide,
and changes when a file is replaced, re-scanned or truncated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

SAMPLE_BYTES = 64 * 1024
SAMPLES_PER_FILE = 16
HASH_VERSION = "sp1"


def is_url(path: str | Path) -> bool:
    """True for fsspec URLs such as ``s3://bucket/slide.svs`` (``file://`` counts as a URL)."""
    return "://" in str(path)


def slide_files(path: str | Path) -> list[Path]:
    """The local files that make up the slide at ``path``, in a stable order."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if path.suffix.lower() == ".mrxs":
        data_dir = path.with_suffix("")
        extra = sorted(p for p in data_dir.iterdir() if p.is_file()) if data_dir.is_dir() else []
        return [path, *extra]
    if path.suffix.lower() == ".dcm":
        return sorted(p for p in path.parent.glob("*.dcm") if p.is_file())
    return [path]


def _samples(size: int) -> Sequence[tuple[int, int]]:
    """(offset, length) pairs to hash: the whole file when small, else evenly spaced samples."""
    if size <= SAMPLE_BYTES * SAMPLES_PER_FILE:
        return [(0, size)]
    last = size - SAMPLE_BYTES
    offsets = {round(i * last / (SAMPLES_PER_FILE - 1)) for i in range(SAMPLES_PER_FILE)}
    return [(offset, SAMPLE_BYTES) for offset in sorted(offsets)]


def _update_with_file(digest: hashlib._Hash, path: str | Path) -> None:
    import fsspec

    with fsspec.open(str(path), "rb") as handle:
        size = handle.seek(0, 2)
        digest.update(f"{size}\0".encode())
        for offset, length in _samples(size):
            handle.seek(offset)
            digest.update(handle.read(length))


def content_hash(path: str | Path) -> str:
    """Return ``sp1-<32 hex>`` for the slide at ``path`` (file, MRXS, or DICOM folder)."""
    digest = hashlib.sha256(HASH_VERSION.encode())
    for file in [path] if is_url(path) else slide_files(path):
        _update_with_file(digest, file)
    return f"{HASH_VERSION}-{digest.hexdigest()[:32]}"


def file_sha256(path: str | Path) -> str:
    """SHA-256 (64 hex digits) of every byte of a local file, read in 1 MiB blocks (for files
    that must be identified exactly, such as a radiology study's instances)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
