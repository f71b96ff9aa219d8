"""The export's HTML pages, filled from the package's templates.

Templates are plain HTML files with ``string.Template`` placeholders; every value put into
them is escaped here: :func:`html.escape` for text and attributes, :func:`script_json` for
data read by the page scripts.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from string import Template
from typing import Any

from .model import SlideView

TEMPLATES = resources.files(__package__).joinpath("templates")


@dataclass(frozen=True)
class WorklistEntry:
    """One worklist row: the slide's view, its triage ``rank`` (1 = highest risk), the
    export-relative URLs of its viewer page and thumbnail, or why they are missing."""

    view: SlideView
    rank: int
    page_url: str | None
    thumbnail_url: str | None
    error: str | None = None


def load_template(name: str) -> Template:
    return Template(TEMPLATES.joinpath(name).read_text(encoding="utf-8"))


def script_json(value: Any) -> str:
    """JSON safe inside an HTML ``<script>`` element: ``<``, ``>`` and ``&`` are escaped as
    ``\\u003c``…, so no value can close the element or open a comment."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _options(values: Sequence[str]) -> str:
    return "".join(f'<option value="{_text(v)}">{_text(v)}</option>'
                   for v in sorted(set(values), key=str.casefold))


def render_index(entries: Sequence[WorklistEntry], *, title: str, settings: str,
                 generated: str, version: str) -> str:
    """The worklist page; ``entries`` are in display order (highest risk first)."""
    row_template = load_template("worklist_row.html")
    rows = [_render_row(row_template, entry) for entry in entries]
    return load_template("index.html").substitute(
        title=_text(title), slide_count=len(entries), rows="".join(rows),
        grade_options=_options([e.view.grade for e in entries]),
        qc_options=_options([e.view.qc_status for e in entries]),
        settings=_text(settings), generated=_text(generated), version=_text(version))


def _render_row(template: Template, entry: WorklistEntry) -> str:
    view = entry.view
    name = _text(view.slide_id)
    if entry.page_url is not None:
        slide_cell = f'<a href="{_text(entry.page_url)}">{name}</a>'
    else:
        slide_cell = f'{name}<span class="error">viewer not available: {_text(entry.error)}</span>'
    thumbnail = (f'<img src="{_text(entry.thumbnail_url)}" alt="thumbnail of {name}" '
                 'loading="lazy">' if entry.thumbnail_url else "–")
    probability = view.grade_probability
    probabilities = ", ".join(f"{grade}: {p:.3f}" for grade, p in view.probabilities.items())
    return template.substitute(
        row_class="failed" if entry.error else "ok", rank=entry.rank,
        name_attr=name, grade_attr=_text(view.grade), qc_attr=_text(view.qc_status),
        probability_value="" if probability is None else repr(probability),
        risk_value=repr(view.risk), slide_cell=slide_cell, grade=_text(view.grade),
        probabilities_title=_text(probabilities), probability=_number(probability, 2),
        risk=_number(view.risk, 3), thumbnail_cell=thumbnail, qc_cell=_text(view.qc_status))


def render_slide_page(view: SlideView, data: dict[str, Any], *, title: str,
                      viewer_mpp: float) -> str:
    """A slide's viewer page; ``data`` is what the page script reads (see ``viewer.js``)."""
    probability_rows = "".join(
        f"<tr><td>{_text(grade)}</td><td>{p:.3f}</td></tr>"
        for grade, p in sorted(view.probabilities.items(), key=lambda item: -item[1]))
    return load_template("slide.html").substitute(
        title=_text(title), name=_text(view.slide_id), grade=_text(view.grade),
        probability=_number(view.grade_probability, 2), risk=_number(view.risk, 3),
        qc_status=_text(view.qc_status), legend=_text(view.legend),
        probability_rows=probability_rows, viewer_mpp=f"{viewer_mpp:.2f}",
        data_json=script_json(data))
