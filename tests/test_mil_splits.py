"""Patient-level splits of mil.splits: k-fold, fixed, leave-one-site-out, files and errors."""

from __future__ import annotations

import csv
import random
from collections import Counter
from pathlib import Path

import pytest

from mil.splits import (
    Fold,
    LabelTable,
    fixed_split,
    leave_one_site_out,
    make_label_table,
    patient_folds,
    read_folds,
    read_label_table,
    write_folds,
)

NAMES = ["benign", "low", "high"]


def _rows(n_patients: int = 45, seed: int = 0) -> list[dict[str, object]]:
    """Patients with 1-4 slides, three sites; some patients mix a lower-grade slide in."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for p in range(n_patients):
        grade = p % 3
        for s in range(rng.randint(1, 4)):
            label = grade if s == 0 or grade == 0 else rng.randint(0, grade)
            rows.append({"slide_id": f"P{p:03d}-S{s}", "patient_id": f"P{p:03d}",
                         "label": NAMES[label], "site": "ABC"[p % 3 if p < 30 else p % 2]})
    return rows


def _table(**kwargs: int) -> LabelTable:
    return make_label_table(_rows(**kwargs), NAMES)


def _worst_label(table: LabelTable) -> dict[str, int]:
    worst: dict[str, int] = {}
    for patient, label in zip(table.column("patient_id"), table.labels, strict=True):
        worst[patient] = max(worst.get(patient, 0), label)
    return worst


def _write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("seed", range(12))
def test_no_patient_in_two_folds_and_design(seed: int) -> None:
    table = _table(seed=seed)
    folds = patient_folds(table, k=5, seed=seed)
    assert len(folds) == 5
    tested: Counter[str] = Counter()
    for i, fold in enumerate(folds):
        assert sorted(fold.slides("train") + fold.val + fold.test) == sorted(
            table.column("slide_id"))
        splits = [fold.patients(s) for s in ("train", "val", "test")]
        assert not (splits[0] & splits[1]) and not (splits[0] & splits[2])
        assert not (splits[1] & splits[2])
        assert fold.patients("val") == folds[(i + 1) % 5].patients("test")
        tested.update(fold.patients("test"))
    assert set(tested) == set(table.column("patient_id"))
    assert set(tested.values()) == {1}


def test_stratified_by_most_severe_label() -> None:
    table = _table(n_patients=47, seed=3)
    worst = _worst_label(table)
    folds = patient_folds(table, k=5, seed=7)
    for label in range(3):
        per_fold = [sum(worst[p] == label for p in f.patients("test")) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1, (label, per_fold)
    sizes = [len(f.patients("test")) for f in folds]
    assert max(sizes) - min(sizes) <= 1


def test_deterministic_and_seed_dependent() -> None:
    rows = _rows()
    assert patient_folds(rows, k=4, seed=5) == patient_folds(rows, k=4, seed=5)
    assert patient_folds(rows, k=4, seed=5) != patient_folds(rows, k=4, seed=6)
    train_test = patient_folds(rows, k=2, seed=1, validation=False)
    assert all(not f.val and f.train and f.test for f in train_test)


def test_write_read_round_trip(tmp_path: Path) -> None:
    folds = patient_folds(_table(), k=3, seed=2)
    paths = write_folds(folds, tmp_path / "folds")
    assert [p.name for p in paths] == ["fold_0.csv", "fold_1.csv", "fold_2.csv"]
    with paths[0].open() as handle:
        assert next(csv.reader(handle)) == ["slide_id", "patient_id", "split"]
    assert read_folds(tmp_path / "folds") == folds


def test_leave_one_site_out_covers_each_site_once() -> None:
    table = _table(n_patients=60, seed=4)
    folds = leave_one_site_out(table, val_fraction=0.25, seed=1)
    assert [f.name for f in folds] == ["A", "B", "C"]
    site_of = dict(zip(table.column("slide_id"), table.column("site"), strict=True))
    tested = [slide for f in folds for slide in f.test]
    assert sorted(tested) == sorted(table.column("slide_id"))
    for fold in folds:
        assert {site_of[s] for s in fold.test} == {fold.name}
        assert fold.name not in {site_of[s] for s in fold.train + fold.val}
        others = len(fold.patients("train")) + len(fold.patients("val"))
        assert len(fold.patients("val")) == round(0.25 * others)
        assert not fold.patients("train") & fold.patients("val")
    assert leave_one_site_out(table, seed=1) == leave_one_site_out(table, seed=1)


def test_fixed_split_column() -> None:
    rows = _rows(n_patients=9)
    split_of = {f"P{p:03d}": ("train", "val", "test")[p % 3] for p in range(9)}
    for row in rows:
        row["split"] = split_of[str(row["patient_id"])]
    fold = fixed_split(make_label_table(rows, NAMES))
    assert fold.name == "fixed"
    assert fold.patients("test") == {p for p, s in split_of.items() if s == "test"}
    rows[0]["split"] = "test" if rows[0]["split"] != "test" else "train"
    patient = rows[0]["patient_id"]
    rows.append({**rows[0], "slide_id": "extra", "split": split_of[str(patient)]})
    with pytest.raises(ValueError, match=f"patient '{patient}'"):
        fixed_split(rows)
    rows[0]["split"] = "holdout"
    with pytest.raises(ValueError, match="holdout"):
        fixed_split(rows)


def test_read_label_table_and_its_errors(tmp_path: Path) -> None:
    rows = _rows(n_patients=6)
    table = read_label_table(_write_csv(tmp_path / "labels.csv", rows), NAMES)
    assert table.label_names == tuple(NAMES)
    assert table.column("site")[0] == "A"
    numeric = [{"slide_id": "a", "patient_id": "p", "label": "3"},
               {"slide_id": "b", "patient_id": "q", "label": "0"}]
    assert make_label_table(numeric).label_names == ("0", "1", "2", "3")
    bad = [dict(r) for r in rows]
    bad[4]["label"] = "medium"
    with pytest.raises(ValueError, match=r"data row 5 .*unknown label 'medium'"):
        read_label_table(_write_csv(tmp_path / "bad.csv", bad), NAMES)
    duplicate = [*rows, dict(rows[2])]
    with pytest.raises(ValueError, match="duplicate slide id, first in data row 3"):
        read_label_table(_write_csv(tmp_path / "dup.csv", duplicate), NAMES)
    no_patient = [{"slide_id": "a", "label": "low"}]
    with pytest.raises(ValueError, match="lacks columns"):
        make_label_table(no_patient, NAMES)


def test_split_file_errors(tmp_path: Path) -> None:
    fold = Fold(0, (("s1", "P1", "train"), ("s2", "P1", "test"), ("s3", "P2", "val")))
    with pytest.raises(ValueError, match="patient 'P1'"):
        write_folds([fold], tmp_path / "w")
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "fold_0.csv").write_text(
        "slide_id,patient_id,split\ns1,P1,train\ns2,P1,test\ns3,P2,val\n")
    with pytest.raises(ValueError, match="patient 'P1' is in both"):
        read_folds(folder)
    (folder / "fold_0.csv").write_text("slide_id,patient_id,split\ns1,P1,test\ns3,P2,train\n")
    (folder / "fold_1.csv").write_text("slide_id,patient_id,split\ns1,P1,test\ns3,P2,train\n")
    with pytest.raises(ValueError, match="patient 'P1' is in the test set of folds 0 and 1"):
        read_folds(folder)
    (folder / "fold_1.csv").write_text("slide_id,patient_id,split\ns1,P1,train\ns1,P1,train\n")
    with pytest.raises(ValueError, match="duplicate slide id 's1'"):
        read_folds(folder)
    with pytest.raises(ValueError, match="no fold_"):
        read_folds(tmp_path / "w")


def test_k_fold_errors() -> None:
    rows = _rows(n_patients=12)
    with pytest.raises(ValueError, match=r"class 'benign' has 4 patients .*fewer than k=5"):
        patient_folds(rows, k=5)
    with pytest.raises(ValueError, match="too small"):
        patient_folds(rows, k=2)
    duplicated = [*rows, dict(rows[0])]
    with pytest.raises(ValueError, match="duplicate slide id"):
        patient_folds(duplicated, k=3)
    two_sites = [*rows, {**rows[0], "slide_id": "moved", "site": "Q"}]
    with pytest.raises(ValueError, match=f"patient '{rows[0]['patient_id']}' has slides at sites"):
        leave_one_site_out(two_sites)
    with pytest.raises(ValueError, match="at least two sites"):
        leave_one_site_out([{**r, "site": "A"} for r in rows])
