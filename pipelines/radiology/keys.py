"""Keyed hashes for pseudonyms: study ids and replacement DICOM UIDs.

One secret key (HMAC-SHA256) makes the same study get the same pseudonym, and the same UID the
same replacement, in every run and every file; without the key nobody can recompute or reverse
them. The key file is created on first use and must be kept outside the exported folders.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from ..heatmaps.pseudonyms import check_outside, load_or_create_key

#: Hex digits kept in a study pseudonym (48 bits).
STUDY_DIGITS = 12


class StudyKeys:
    """Pseudonyms from one secret key: ``study_id(identity)`` and ``uid(original)``."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the pseudonym key must be at least 16 bytes")
        self._key = key

    @classmethod
    def from_file(cls, path: str | Path) -> StudyKeys:
        """Keys from the hex key file ``path`` (created, owner-readable only, when missing)."""
        return cls(load_or_create_key(Path(path)))

    @classmethod
    def for_output(cls, out: Path, key_file: Path | None = None) -> StudyKeys:
        """The keys of the output folder ``out``: ``key_file``, else ``OUT-radiology.key``
        beside ``out``; a key inside ``out`` is refused (PseudonymError)."""
        path = key_file or out.absolute().parent / f"{out.name}-radiology.key"
        check_outside(path, out)
        return cls.from_file(path)

    def digest(self, purpose: str, value: str) -> bytes:
        """HMAC-SHA256 of ``value`` for ``purpose`` (separate domains never collide)."""
        return hmac.new(self._key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()

    def study_id(self, identity: str) -> str:
        """``study-<12 hex>`` for a study identity (UIDs or a content hash; never stored)."""
        return f"study-{self.digest('study', identity).hex()[:STUDY_DIGITS]}"

    def uid(self, original: str) -> str:
        """A replacement UID under the ``2.25`` (UUID-derived) root, the same for the same
        original UID, valid (at most 64 characters, no leading zeros)."""
        number = int.from_bytes(self.digest("uid", original)[:16], "big")
        return f"2.25.{number}"
