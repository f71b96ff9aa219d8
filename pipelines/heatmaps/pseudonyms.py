"""Stable pseudonyms for slide names: a keyed hash (HMAC-SHA256), so the same slide gets the
same pseudonym in every export made with the same key, and nobody without the key can recompute
or reverse it. The key file and the mapping CSV live outside the export folder."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import os
import secrets
from pathlib import Path

from wsi.atomic import write_bytes_atomic, write_text_atomic

#: Hex digits of the keyed hash kept in a pseudonym (48 bits: collisions are negligible for
#: archives of millions of slides).
PSEUDONYM_DIGITS = 12


class PseudonymError(ValueError):
    """The key or the mapping cannot be used; the message names the file."""


def default_mapping_path(out: Path) -> Path:
    """``OUT-pseudonyms.csv`` beside the export folder ``OUT``."""
    out = Path(out).absolute()
    return out.parent / f"{out.name}-pseudonyms.csv"


def check_outside(path: Path, out: Path) -> None:
    """Refuse ``path`` when it lies inside the export folder ``out``."""
    resolved, folder = Path(path).resolve(), Path(out).resolve()
    if resolved == folder or folder in resolved.parents:
        raise PseudonymError(f"{path} is inside the export folder {out}; the pseudonym key and "
                             "mapping must be kept outside it (choose a path elsewhere)")


def load_or_create_key(path: Path) -> bytes:
    """The secret key in ``path`` (hex); a new random key is written there when it is missing,
    readable by its owner only."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, (secrets.token_hex(32) + "\n").encode())
        os.chmod(path, 0o600)
    try:
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as error:
        raise PseudonymError(f"{path}: cannot read the pseudonym key ({error}); it must hold "
                             "hex digits, e.g. made by a previous slidepipe run") from error
    if len(key) < 16:
        raise PseudonymError(f"{path}: the pseudonym key is shorter than 16 bytes")
    return key


class Pseudonymiser:
    """Maps slide ids to pseudonyms ``slide-<12 hex digits>`` and remembers what it mapped."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.mapping: dict[str, str] = {}

    def __call__(self, slide_id: str) -> str:
        digest = hmac.new(self._key, slide_id.encode(), hashlib.sha256).hexdigest()
        pseudonym = f"slide-{digest[:PSEUDONYM_DIGITS]}"
        self.mapping[slide_id] = pseudonym
        return pseudonym

    def write_mapping(self, path: Path) -> Path:
        """Merge the pseudonyms made so far into the CSV ``path`` (slide_id, pseudonym)."""
        rows: dict[str, str] = {}
        if path.exists():
            with open(path, newline="") as handle:
                rows = {r["slide_id"]: r["pseudonym"] for r in csv.DictReader(handle)}
        rows.update(self.mapping)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["slide_id", "pseudonym"])
        writer.writerows(sorted(rows.items()))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, buffer.getvalue())
        return path
