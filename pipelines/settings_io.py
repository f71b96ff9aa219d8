"""What every YAML settings loader of slidepipe shares: merging overrides into the loaded data
and one readable line from pydantic's validation errors.

Torch-free on purpose: the heatmap exporters load their settings without the backbone registry.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


def merge_settings(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied, nested mappings merged key by key; ``None`` values
    in ``overrides`` are ignored (a CLI flag that was not given). ``base`` is not modified."""
    merged = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict):
            current = merged.get(key)
            merged[key] = merge_settings(current if isinstance(current, dict) else {}, value)
        else:
            merged[key] = value
    return merged


def validation_problems(error: ValidationError, prefix: str = "") -> str:
    """Every problem of ``error`` as ``field.path: message``, joined by ``; `` (fields under
    ``prefix``, e.g. ``heatmap.``; checks of the whole model are named ``config``)."""
    return "; ".join(
        f"{prefix}{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"]
        else f"{prefix.rstrip('.') or 'config'}: {e['msg']}"
        for e in error.errors())
