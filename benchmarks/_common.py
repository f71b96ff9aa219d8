"""Helpers shared by the benchmark scripts: test data, timing and table printing.

Benchmarks build their own slides with the test builders (real H&E tissue from
``../shared/data``) and cache them under ``benchmarks/_data/`` (git-ignored). Timings are the
best (minimum) of several repeats, because the machines they run on are small and noisy; every
figure is printed beside its baseline, measured in the same run, as a ratio.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, TypeVar

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
DATA_DIR: Final = REPO_ROOT / "benchmarks" / "_data"

if str(REPO_ROOT) not in sys.path:  # the test builders live in tests/, not in the package
    sys.path.insert(0, str(REPO_ROOT))

T = TypeVar("T")

#: Environment variables that make numeric libraries run on one thread.
SINGLE_THREAD_ENV: Final = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                            "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def force_single_thread() -> None:
    """Pin numeric libraries to one thread. Call before importing numpy, scipy or OpenCV."""
    for name in SINGLE_THREAD_ENV:
        os.environ[name] = "1"


def real_svs() -> Path:
    """The real Aperio scan (CMU-1-Small-Region, 240 px JPEG tiles) next to the repository."""
    from tests.builders import REAL_SVS

    if not REAL_SVS.is_file():
        raise SystemExit(f"real slide missing: {REAL_SVS}; the benchmarks need "
                         "../shared/data/CMU-1-Small-Region.svs next to the repository")
    return REAL_SVS


def _cached(name: str, build: Callable[[Path], Path]) -> Path:
    """``benchmarks/_data/<name>``, written by ``build(DATA_DIR)`` when it is missing."""
    path = DATA_DIR / name
    if not path.is_file():
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        print(f"building {path} (once)…", flush=True)
        real_svs()
        start = time.perf_counter()
        built = build(DATA_DIR)
        assert built == path, built
        print(f"built {path.name} in {time.perf_counter() - start:.1f} s", flush=True)
    return path


def resection_svs() -> Path:
    """The 40960 x 40960 resection-like Aperio SVS of
    :func:`tests.builders.build_resection_svs` (real tissue over about 40 % of the slide, JPEG
    quality 70), built once and cached in ``benchmarks/_data/`` (delete the file to rebuild
    it). The benchmarks' main slide."""
    from tests.builders import build_resection_svs

    return _cached("resection.svs", build_resection_svs)


def resection_svs_of_side(side: int) -> Path:
    """The resection-like SVS of :func:`tests.builders.build_resection_svs` at ``side`` x
    ``side`` level-0 pixels (same layout rules, so about ``(side / 40960)²`` of the full
    slide's patches), cached as ``benchmarks/_data/resection-<side>/resection.svs``. The full
    40960 px slide is :func:`resection_svs`."""
    from tests.builders import build_resection_svs

    if side == 40960:
        return resection_svs()
    folder = f"resection-{side}"

    def build(data_dir: Path) -> Path:
        (data_dir / folder).mkdir(exist_ok=True)
        return build_resection_svs(data_dir / folder, (side, side))

    return _cached(f"{folder}/resection.svs", build)


def large_svs() -> Path:
    """The sparse 40960 x 40960 Aperio SVS of :func:`tests.builders.build_large_svs` (eight
    small biopsies, 1 % tissue, JPEG quality 90), built once and cached in
    ``benchmarks/_data/`` (delete the file to rebuild it). Shown for information."""
    from tests.builders import build_large_svs

    return _cached("large.svs", build_large_svs)


def best_of(function: Callable[[], T], repeats: int) -> tuple[float, T]:
    """(Fastest wall time in seconds over ``repeats`` calls, result of the last call)."""
    best = float("inf")
    result: T | None = None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result  # type: ignore[return-value]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a plain-text table with right-aligned columns (first column left-aligned)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    print(line(cells[0]))
    print("  ".join("-" * width for width in widths))
    for row in cells[1:]:
        print(line(row))


def verdict(name: str, passed: bool, detail: str) -> bool:
    """Print one ``PASS``/``MISS`` line for a target and return ``passed``."""
    print(f"{'PASS' if passed else 'MISS'}  {name}: {detail}")
    return passed


def peak_rss(pid: int | str = "self") -> int:
    """The process's peak RSS since its last exec, in bytes (``VmHWM`` in /proc). Not
    ``getrusage``: its ``ru_maxrss`` keeps the parent's high-water mark across fork and exec,
    so a process started by a large one reports the parent's peak."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine() -> str:
    """A one-line description of this machine."""
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python "
            f"{platform.python_version()}, {platform.system()}")


def mib(size: int) -> str:
    """Bytes as MiB."""
    return f"{size / 2**20:.0f} MiB"


def ms(seconds: float) -> str:
    """Seconds as milliseconds with one decimal."""
    return f"{seconds * 1e3:.1f} ms"
