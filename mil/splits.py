"""Patient-level data splits: stratified k-fold, fixed splits and leave-one-site-out.

A label table has one row per slide with columns ``slide_id``, ``patient_id`` and ``label`` plus
optional ``site``, ``split`` and other subgroup columns (read with the stdlib ``csv`` module).
Slides of one patient never straddle splits. For stratification a patient's label is their most
severe slide label: the highest index in ``label_names`` (``LabelTable``), or the maximum value
for other columns and plain rows (integer-like strings compare as integers).

k-fold design: patients are dealt into ``k`` folds stratum by stratum; fold ``i`` tests on fold
``i``, validates on fold ``(i + 1) mod k`` and trains on the rest (``validation=False``: trains on
all other folds). Fold files ``fold_<i>.csv`` hold ``slide_id, patient_id, split`` rows.
"""

from __future__ import annotations

import csv
import random
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("slide_id", "patient_id", "label")
FOLD_COLUMNS = ("slide_id", "patient_id", "split")
Rows = Sequence[Mapping[str, object]]
Stratum = tuple[int, str]


@dataclass(frozen=True)
class LabelTable:
    """Validated slide rows (cells as stripped strings) and the ordered class names."""

    rows: tuple[dict[str, str], ...]
    label_names: tuple[str, ...]

    def column(self, name: str) -> list[str]:
        """All values of one column; ValueError when it is missing."""
        if self.rows and name not in self.rows[0]:
            raise ValueError(f"label table has no column {name!r}")
        return [row.get(name, "") for row in self.rows]

    @property
    def labels(self) -> list[int]:
        """Class index of every slide (position of its label in ``label_names``)."""
        index = {name: i for i, name in enumerate(self.label_names)}
        return [index[row["label"]] for row in self.rows]


@dataclass(frozen=True)
class Fold:
    """One split of the slides: ``(slide_id, patient_id, split)`` per slide, in table order."""

    index: int
    assignments: tuple[tuple[str, str, str], ...]
    name: str = ""

    def slides(self, split: str) -> list[str]:
        """Slide ids assigned to ``split``: ``"train"``, ``"val"`` or ``"test"``."""
        return [slide for slide, _, where in self.assignments if where == split]

    def patients(self, split: str) -> set[str]:
        """Patient ids assigned to ``split``."""
        return {patient for _, patient, where in self.assignments if where == split}

    @property
    def train(self) -> list[str]:
        """Training slide ids."""
        return self.slides("train")

    @property
    def val(self) -> list[str]:
        """Validation slide ids (empty for train/test designs)."""
        return self.slides("val")

    @property
    def test(self) -> list[str]:
        """Test slide ids."""
        return self.slides("test")


def make_label_table(rows: Rows, label_names: Sequence[str] | None = None) -> LabelTable:
    """Validate plain rows (e.g. a list of dicts) into a :class:`LabelTable`.

    ``label_names`` gives the classes in severity order; without it integer-like labels become
    ``"0" .. str(max)`` and other labels are sorted. Raises ValueError naming the data row
    (1-based, header excluded) for missing columns or ids, unknown labels and duplicate slides.
    """
    table = [{str(k): "" if v is None else str(v).strip() for k, v in row.items() if k is not None}
             for row in rows]
    if not table:
        raise ValueError("label table has no rows")
    if missing := [c for c in REQUIRED_COLUMNS if c not in table[0]]:
        raise ValueError(f"label table lacks columns {missing}; needs {list(REQUIRED_COLUMNS)}")
    values = sorted({row["label"] for row in table})
    if label_names is None and all(re.fullmatch(r"\d+", v) for v in values):
        label_names = [str(i) for i in range(max(int(v) for v in values) + 1)]
        for row in table:
            row["label"] = str(int(row["label"]))
    label_names = values if label_names is None else label_names
    names = tuple(str(name) for name in label_names)
    first: dict[str, int] = {}
    for number, row in enumerate(table, start=1):
        slide, where = row.get("slide_id", ""), f"data row {number} (slide {row.get('slide_id')!r})"
        if any(row.get(c, "") == "" for c in REQUIRED_COLUMNS):
            raise ValueError(f"{where}: empty or missing {list(REQUIRED_COLUMNS)} value")
        if row["label"] not in names:
            raise ValueError(f"{where}: unknown label {row['label']!r}; expected one of {names}")
        if first.setdefault(slide, number) != number:
            raise ValueError(f"{where}: duplicate slide id, first in data row {first[slide]}")
    return LabelTable(tuple(table), names)


def read_label_table(path: str | Path, label_names: Sequence[str] | None = None) -> LabelTable:
    """Read a label CSV (header row; see :func:`make_label_table` for the checks)."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return make_label_table(rows, label_names)


def _patient_strata(table: LabelTable, label_column: str,
                    patient_column: str) -> dict[str, Stratum]:
    """Each patient's ``(severity, label)``: the maximum (most severe) label of their slides."""
    raw = table.column(label_column)
    if label_column == "label":
        keys = [(index, value) for index, value in zip(table.labels, raw, strict=True)]
    elif all(re.fullmatch(r"-?\d+", v) for v in raw):
        keys = [(int(v), v) for v in raw]
    else:
        keys = [(0, v) for v in raw]
    strata: dict[str, Stratum] = {}
    for patient, key in zip(table.column(patient_column), keys, strict=True):
        strata[patient] = max(strata.get(patient, key), key)
    return strata


def _by_stratum(strata: Mapping[str, Stratum], rng: random.Random) -> dict[Stratum, list[str]]:
    """Patients grouped by stratum (sorted keys), shuffled within each stratum."""
    groups: dict[Stratum, list[str]] = defaultdict(list)
    for patient in sorted(strata):
        groups[strata[patient]].append(patient)
    for key in sorted(groups):
        rng.shuffle(groups[key])
    return {key: groups[key] for key in sorted(groups)}


def _fold(index: int, table: LabelTable, split_of: Mapping[str, str], patient_column: str,
          name: str = "") -> Fold:
    """A :class:`Fold` assigning every slide its patient's split."""
    rows = zip(table.column("slide_id"), table.column(patient_column), strict=True)
    return Fold(index, tuple((s, p, split_of[p]) for s, p in rows), name or f"fold_{index}")


def patient_folds(table: LabelTable | Rows, k: int = 5, seed: int = 0, label_column: str = "label",
                  patient_column: str = "patient_id", *, validation: bool = True) -> list[Fold]:
    """Patient-level stratified k-fold (see the module docstring for the design).

    Patients of each stratum are shuffled with ``seed`` and dealt round-robin, continuing the
    rotation across strata, so every fold holds each class within one patient of the others.
    Raises ValueError for ``k`` too small (< 3 with validation, < 2 without) or a class with
    fewer patients than ``k``.
    """
    data = table if isinstance(table, LabelTable) else make_label_table(table)
    if k < (3 if validation else 2):
        raise ValueError(f"k={k} is too small; need k >= {3 if validation else 2}")
    rng = random.Random(seed)
    fold_of: dict[str, int] = {}
    position = rng.randrange(k)
    strata = _patient_strata(data, label_column, patient_column)
    for stratum, members in _by_stratum(strata, rng).items():
        if len(members) < k:
            raise ValueError(f"class {stratum[1]!r} has {len(members)} patients (by most severe "
                             f"label), fewer than k={k} folds")
        for patient in members:
            fold_of[patient] = position % k
            position += 1
    folds = []
    for i in range(k):
        role = {i: "test", (i + 1) % k: "val"} if validation else {i: "test"}
        split_of = {p: role.get(f, "train") for p, f in fold_of.items()}
        folds.append(_fold(i, data, split_of, patient_column))
    return folds


def fixed_split(table: LabelTable | Rows, split_column: str = "split",
                patient_column: str = "patient_id") -> Fold:
    """The train/val/test split given by a column of the label table, as one fold.

    Raises ValueError for a value other than train/val/test or a patient in two splits.
    """
    data = table if isinstance(table, LabelTable) else make_label_table(table)
    split_of: dict[str, str] = {}
    for patient, split in zip(data.column(patient_column), data.column(split_column), strict=True):
        if split not in SPLITS:
            raise ValueError(f"patient {patient!r}: split {split!r} is not one of {SPLITS}")
        if split_of.setdefault(patient, split) != split:
            raise ValueError(f"patient {patient!r} has slides in {split_of[patient]!r} and "
                             f"{split!r}")
    return _fold(0, data, split_of, patient_column, "fixed")


def leave_one_site_out(table: LabelTable | Rows, site_column: str = "site",
                       val_fraction: float = 0.2, seed: int = 0, label_column: str = "label",
                       patient_column: str = "patient_id") -> list[Fold]:
    """One fold per site (sorted): test on that site, train and validate on the others.

    The validation set is about ``val_fraction`` of the other sites' patients (at least one
    when the fraction is positive), drawn stratified: within each stratum patients are shuffled
    and spread evenly along a common order whose first patients form the validation set.
    Raises ValueError for fewer than two sites or a patient with slides at two sites.
    """
    data = table if isinstance(table, LabelTable) else make_label_table(table)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    site_of: dict[str, str] = {}
    for patient, site in zip(data.column(patient_column), data.column(site_column), strict=True):
        if site_of.setdefault(patient, site) != site:
            raise ValueError(f"patient {patient!r} has slides at sites {site_of[patient]!r} "
                             f"and {site!r}")
    sites = sorted(set(site_of.values()))
    if len(sites) < 2:
        raise ValueError(f"leave-one-site-out needs at least two sites, found {sites}")
    strata = _patient_strata(data, label_column, patient_column)
    folds = []
    for index, site in enumerate(sites):
        rng = random.Random(f"{seed}:{site}")
        others = {p: key for p, key in strata.items() if site_of[p] != site}
        spread = [((j + 0.5) / len(members), rng.random(), patient)
                  for members in _by_stratum(others, rng).values()
                  for j, patient in enumerate(members)]
        n_val = round(val_fraction * len(others))
        n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(others) - 1)
        val = {patient for *_, patient in sorted(spread)[:n_val]}
        split_of = {p: "test" if s == site else ("val" if p in val else "train")
                    for p, s in site_of.items()}
        folds.append(_fold(index, data, split_of, patient_column, site))
    return folds


def validate_folds(folds: Sequence[Fold]) -> None:
    """Raise ValueError for duplicate slides in a fold, a patient in two splits of one fold, a
    slide whose patient differs between folds, or a patient tested in two folds."""
    patient_of: dict[str, str] = {}
    tested_in: dict[str, int] = {}
    for fold in folds:
        seen: set[str] = set()
        split_of: dict[str, str] = {}
        for slide, patient, split in fold.assignments:
            if split not in SPLITS:
                raise ValueError(f"fold {fold.index}, slide {slide!r}: unknown split {split!r}")
            if slide in seen:
                raise ValueError(f"fold {fold.index}: duplicate slide id {slide!r}")
            seen.add(slide)
            if patient_of.setdefault(slide, patient) != patient:
                raise ValueError(f"slide {slide!r} belongs to patients {patient_of[slide]!r} "
                                 f"and {patient!r}")
            if split_of.setdefault(patient, split) != split:
                raise ValueError(f"fold {fold.index}: patient {patient!r} is in both "
                                 f"{split_of[patient]!r} and {split!r}")
        for patient in fold.patients("test"):
            if tested_in.setdefault(patient, fold.index) != fold.index:
                raise ValueError(f"patient {patient!r} is in the test set of folds "
                                 f"{tested_in[patient]} and {fold.index}")


def write_folds(folds: Sequence[Fold], folder: str | Path) -> list[Path]:
    """Write ``fold_<index>.csv`` (columns slide_id, patient_id, split) per fold into ``folder``.

    Fold names (e.g. the held-out site) are not stored; :func:`read_folds` names them ``fold_<i>``.
    """
    validate_folds(folds)
    Path(folder).mkdir(parents=True, exist_ok=True)
    paths = [Path(folder) / f"fold_{fold.index}.csv" for fold in folds]
    for fold, path in zip(folds, paths, strict=True):
        with path.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([FOLD_COLUMNS, *fold.assignments])
    return paths


def read_folds(folder: str | Path) -> list[Fold]:
    """Read every ``fold_<index>.csv`` of ``folder`` in index order and validate the set."""
    found = [(int(m.group(1)), path) for path in Path(folder).glob("fold_*.csv")
             if (m := re.fullmatch(r"fold_(\d+)\.csv", path.name))]
    if not found:
        raise ValueError(f"no fold_<i>.csv files in {folder}")
    folds = []
    for index, path in sorted(found):
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != FOLD_COLUMNS:
                raise ValueError(f"{path}: columns must be {list(FOLD_COLUMNS)}")
            rows = tuple((r["slide_id"].strip(), r["patient_id"].strip(), r["split"].strip())
                         for r in reader)
        folds.append(Fold(index, rows, f"fold_{index}"))
    validate_folds(folds)
    return folds
