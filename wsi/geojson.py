"""QuPath-compatible GeoJSON in level-0 pixel coordinates: tissue polygons out, annotation
polygons (include/exclude regions) in."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry import MultiPolygon, Polygon, mapping, shape

from .errors import AnnotationError


def polygons_to_feature_collection(polygons: Iterable[Polygon], classification: str,
                                   color: tuple[int, int, int] = (0, 160, 0),
                                   properties: Iterable[dict[str, Any]] | None = None
                                   ) -> dict[str, Any]:
    """A FeatureCollection of QuPath annotations; coordinates are level-0 pixels."""
    extra = list(properties) if properties is not None else None
    features = []
    for index, polygon in enumerate(polygons):
        props: dict[str, Any] = {
            "objectType": "annotation",
            "classification": {"name": classification, "color": list(color)},
        }
        if extra is not None:
            props["measurements"] = extra[index]
        features.append({"type": "Feature", "geometry": mapping(polygon), "properties": props})
    return {"type": "FeatureCollection", "features": features}


def read_polygons(path: str | Path) -> list[Polygon]:
    """Read every polygon of a GeoJSON file (FeatureCollection, Feature list or geometry), as
    QuPath exports them, in level-0 pixel coordinates. Invalid rings are repaired."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise AnnotationError(path, f"cannot read annotations: {error}") from error
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        geometries = [f.get("geometry") for f in data.get("features", [])]
    elif isinstance(data, list):
        geometries = [f.get("geometry", f) for f in data]
    elif isinstance(data, dict) and data.get("type") == "Feature":
        geometries = [data.get("geometry")]
    else:
        geometries = [data]
    polygons: list[Polygon] = []
    for geometry in geometries:
        if not geometry:
            continue
        try:
            geom = shapely.make_valid(shape(geometry))
        except Exception as error:
            raise AnnotationError(path, f"invalid geometry: {error}") from error
        parts = geom.geoms if hasattr(geom, "geoms") else [geom]
        polygons.extend(p for part in parts
                        for p in (part.geoms if isinstance(part, MultiPolygon) else [part])
                        if isinstance(p, Polygon) and not p.is_empty)
    if not polygons:
        raise AnnotationError(path, "no polygons found; annotations must be Polygon or "
                              "MultiPolygon features in level-0 pixel coordinates")
    return polygons
