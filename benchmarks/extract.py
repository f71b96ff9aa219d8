"""Feature extraction throughput: slidepipe end to end against the backbone alone and CLAM's way.

Run ``.venv/bin/python benchmarks/extract.py`` (``--quick`` for a smoke run).

Patches/s for each backbone, the default ``efficientnet_lite0`` (embedded ImageNet weights) and
``resnet50_trunc`` (``pretrained: false``: offline there are no ImageNet weights for it, and
random weights run at the same speed), three ways:

(a) slidepipe end to end: ``pipelines.extract.extract_archive`` in a fresh process, with the
    default configuration (on a CPU-only machine a LocalCluster of one single-threaded model
    worker per core, ADR 0005; batch 64, 2 decode threads per task, chunks of 512 patches,
    float16 zarr store plus the HDF5 export). The grids are made beforehand by ``tile_slide``
    and copied in, so (a) measures extraction, not tiling. The clock runs from the
    ``extract_archive`` call to its return: the client's own model load, planning, LocalCluster
    start, the workers' imports and model loads, every chunk, finalising, exports and cluster
    shutdown (the process start and imports before the call are shown, not counted). Each
    archive starts with the real CMU-1-Small-Region (54 patches), so the first chunk to land
    carries the start-up; the chunks after it give the steady rate, and start-up = time to the
    first chunk minus its patches at the steady rate. The all-in rate (all patches / all of that
    time) is the figure the targets use.
(b) the ceiling: the same ``Embedder`` on real patches of the slide already decoded into one
    uint8 array, fed in batches of the same size, after a warm-up batch, in fresh processes:
    as many at once as slidepipe has model workers, each with a worker's torch threads, started
    together once all are warm (patches/s = all their patches / time to the last one's end).
    Where that layout is not one process using every core, that one is measured too, and the
    ceiling is the faster of the two: the best the backbone alone does on this machine. Each
    layout is measured before and after (a); the mean of the two rates is used (only the clean
    one when other processes took over 5 % of the CPUs during the other).
(c) CLAM's extractor, re-implemented: a ``torch.utils.data.DataLoader`` over a
    ``Whole_Slide_Bag_FP``-style dataset. Coordinates come from an HDF5 file made CLAM's way:
    its segmentation at the level nearest 64x (``tiling.clam_segment``, with ``a_t = 1`` so
    small slides keep their tissue), then per contour every ``patch`` step from the contour's
    bounding-box corner (so NOT on the slide's tile grid), x-major as ``np.meshgrid(...,
    indexing="ij")`` orders them, kept by the ``four_pt`` test. Each item reads its coordinate
    from the HDF5 file, then ``openslide.OpenSlide.read_region(...).convert("RGB")``, then
    torchvision ``Resize(input size)``, ``ToTensor()``, ``Normalize(mean, std)``. The model is
    the same backbone in CLAM's form (fp32, NCHW, not channels-last), run under
    ``torch.inference_mode()`` with torch on every core; features are appended to an HDF5 file
    per batch. ``num_workers`` as CLAM sets it: 0 without CUDA, 8 (with ``pin_memory``) with
    CUDA. Model load and patching are not timed.

Peak RSS: the (a) processes of a small and a 16x larger resection-like slide (each after the
54-patch warm-up slide), as ``VmHWM`` from /proc (exact high-water marks): the client process,
which also runs the scheduler and the nannies, read when ``extract_archive`` returns, and its
descendants (the largest worker), polled every 0.2 s with the peak of the tree's summed RSS.
(``getrusage`` would not do: ``ru_maxrss`` keeps the parent's high-water mark across fork and
exec.)

Slides: ``tests.builders.build_resection_svs`` at 10240² (768 patches) and 40960² (11 888,
the representative resection of benchmarks/README.md), cached in ``benchmarks/_data/``; real
tissue, Aperio JPEG Q=70. (a) is the 40960² archive for both backbones (11 942 patches with the
warm-up slide; a nightly run likewise pays its start-up once for an archive), and for
efficientnet_lite0 also the 10240² one, the small slide of the RSS comparison. (b) uses 512 /
256 patches per process, (c) half as many.

Every step also reports the share of the CPUs that other processes (or the hypervisor) took
meanwhile, from /proc/stat minus this benchmark's own CPU time; a warning is printed above 5 %.

Targets: on a CPU, (a) ≥ 0.9 x (b) for both backbones; on a GPU (only when
``torch.cuda.is_available()``), (a) ≥ 0.9 x (b) and (a) ≥ 2 x (c); peak RSS of client and worker
on the larger slide within 10 % of the smaller one. ``--quick``: 3072² and 6144² slides, 64
patches, efficientnet_lite0 only, (b) only before (a) (about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psutil
import torch
from _clam_extractor import clam_coords, clam_seconds
from _common import (
    DATA_DIR,
    machine,
    peak_rss,
    print_table,
    real_svs,
    resection_svs_of_side,
    verdict,
)

import wsi
from pipelines.backbones import load_backbone
from pipelines.cluster import ClusterConfig, default_torch_threads, default_workers
from pipelines.config import SlidepipeConfig, load_config
from pipelines.discovery import SlideEntry
from pipelines.extract import extract_archive
from pipelines.inference import Embedder
from pipelines.tile import tile_slide

#: Targets.
TARGET_VS_CEILING = 0.9
TARGET_VS_CLAM_GPU = 2.0
TARGET_RSS_GROWTH = 1.10
#: Above this share of the CPUs taken by other processes during a step, a warning is printed.
NOISY_SHARE = 0.05

#: The backbones measured: (name, pretrained).
BACKBONES = (("efficientnet_lite0", True), ("resnet50_trunc", False))

RESULT_MARK = "EXTRACT-BENCH-RESULT "
READY_MARK = "EXTRACT-BENCH-READY"
T = TypeVar("T")
WARMUP_ID = "CMU-1-Small-Region"


# -- the slidepipe run, in a fresh process ----------------------------------------------------
class TreeSampler(threading.Thread):
    """Polls this process's descendants: the last ``VmHWM`` seen of each (it only grows) and
    the peak of the tree's summed RSS."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.stop_event = threading.Event()
        self.peaks: dict[int, int] = {}
        self.tree = 0

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop_event.is_set():
            try:
                total = me.memory_info().rss
                for child in me.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        continue
                    self.peaks[child.pid] = max(self.peaks.get(child.pid, 0),
                                                peak_rss(child.pid))
                self.tree = max(self.tree, total)
            except psutil.Error:
                pass
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


def slidepipe_config(backbone: str, pretrained: bool) -> SlidepipeConfig:
    """The default configuration with only the backbone chosen."""
    return load_config(None, {"backbone": {"name": backbone, "pretrained": pretrained}})


def reap_forkserver() -> None:
    """Stop and wait for the forkserver that forked the LocalCluster's workers (it reaps them),
    so their CPU time counts as this benchmark's in the steps' share of others, not as another
    process's."""
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)  # private: no public API
    if stop is not None:
        stop()


def child_main(spec: dict[str, Any]) -> int:
    """In a fresh process: run one (b) process or one extraction; print the figures as one
    JSON line. A (b) process prints ``READY_MARK`` once warm and starts at a line on stdin."""
    config = slidepipe_config(spec["backbone"], spec["pretrained"])
    if spec["mode"] == "ceiling":
        torch.set_num_threads(spec["threads"])
        patches = decoded_patches(Path(spec["slide"]), Path(spec["grid"]), spec["patches"])
        embedder = Embedder(load_backbone(config.backbone))
        batch = config.backbone.batch_size
        embedder(patches[:batch])
        print(READY_MARK, flush=True)
        sys.stdin.readline()
        for first in range(0, len(patches), batch):
            embedder(patches[first:first + batch])
        print(RESULT_MARK + json.dumps({"end": time.time()}), flush=True)
        return 0
    entries = [SlideEntry(path=Path(path), slide_id=slide_id) for path, slide_id in
               spec["entries"]]
    marks: list[tuple[float, str, int]] = []

    def progress(slide_id: str, done: int, total: int) -> None:
        marks.append((time.time(), slide_id, done))

    sampler = TreeSampler()
    sampler.start()
    start = time.time()
    results = extract_archive(entries, config, Path(spec["out"]), on_progress=progress)
    end = time.time()
    reap_forkserver()
    sampler.stop()
    own = peak_rss()
    report = {
        "start": start, "end": end, "marks": marks,
        "results": [{"slide_id": r.slide_id, "status": r.status, "patches": r.patches,
                     "error": r.error} for r in results],
        "client_peak": own, "worker_peak": max(sampler.peaks.values(), default=0),
        "polled_tree": sampler.tree,
    }
    print(RESULT_MARK + json.dumps(report), flush=True)
    return 0


@dataclass
class SlideRun:
    """One (a) run: what it processed, when its chunks landed, and its memory peaks."""

    label: str
    backbone: str
    slides: list[tuple[str, int]]
    launched: float
    start: float
    end: float
    chunks: list[tuple[float, int]]
    client_peak: int
    worker_peak: int
    polled_tree: int

    @property
    def patches(self) -> int:
        return sum(count for _, count in self.slides)

    @property
    def wall(self) -> float:
        """Seconds inside ``extract_archive``."""
        return self.end - self.start

    @property
    def all_in(self) -> float:
        """Patches/s over everything inside ``extract_archive``."""
        return self.patches / self.wall

    @property
    def steady(self) -> float:
        """Patches/s of the chunks that landed after the first one."""
        first_time, first_count = self.chunks[0]
        return (self.patches - first_count) / (self.chunks[-1][0] - first_time)

    @property
    def startup(self) -> float:
        """Time to the first chunk minus that chunk's patches at the steady rate."""
        first_time, first_count = self.chunks[0]
        return first_time - self.start - first_count / self.steady

    @property
    def tail(self) -> float:
        """From the last chunk landing to the return (finalise, export, cluster shutdown)."""
        return self.end - self.chunks[-1][0]

    @property
    def imports(self) -> float:
        """From launching the process to calling ``extract_archive`` (interpreter, imports)."""
        return self.start - self.launched


def child_command(spec: dict[str, Any]) -> list[str]:
    """The command running this script with ``--child spec``."""
    return [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]


def result_line(label: str, returncode: int | None, stdout: str, stderr: str) -> dict[str, Any]:
    """The JSON report a child printed, or exit naming what failed."""
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARK)]
    if returncode != 0 or not lines:
        raise SystemExit(f"{label}: the benchmark process failed ({returncode}):\n"
                         f"{stdout[-3000:]}\n{stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def run_child(label: str, spec: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(launch time, JSON report) of this script run with ``--child spec``."""
    launched = time.time()
    done = subprocess.run(child_command(spec), capture_output=True, text=True, check=False)
    return launched, result_line(label, done.returncode, done.stdout, done.stderr)


def run_slidepipe(label: str, backbone: str, pretrained: bool,
                  slides: list[tuple[Path, str, int]], work: Path, templates: Path) -> SlideRun:
    """(a): extract ``slides`` ((path, slide_id, patches)) in a fresh process, their grids
    copied from ``templates``."""
    out = work / label
    out.mkdir(parents=True)
    for _, slide_id, _ in slides:
        shutil.copytree(templates / slide_id, out / slide_id)
    spec = {"mode": "extract", "backbone": backbone, "pretrained": pretrained,
            "out": str(out), "entries": [[str(path), slide_id] for path, slide_id, _ in slides]}
    launched, report = run_child(label, spec)
    failed = [r for r in report["results"] if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"{label}: slides not extracted: {failed}")
    shutil.rmtree(out)
    chunks: list[tuple[float, int]] = []
    done_by_slide: dict[str, int] = {}
    for when, slide_id, done_patches in sorted(report["marks"]):
        chunks.append((when, done_patches - done_by_slide.get(slide_id, 0)))
        done_by_slide[slide_id] = done_patches
    counted = {r["slide_id"]: r["patches"] for r in report["results"]}
    assert done_by_slide == counted, (done_by_slide, counted)
    return SlideRun(label, backbone, [(slide_id, count) for _, slide_id, count in slides],
                    launched, report["start"], report["end"], chunks, report["client_peak"],
                    report["worker_peak"], report["polled_tree"])


# -- (b) the ceiling ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """How the backbone's processes share the machine: ``processes`` x ``threads`` torch
    threads."""

    processes: int
    threads: int

    def __str__(self) -> str:
        return f"{self.processes}x{self.threads}"


def ceiling_rate(label: str, spec: dict[str, Any], layout: Layout) -> float:
    """Patches/s of ``layout.processes`` (b) processes started together once all are warm."""
    children = [subprocess.Popen(child_command({**spec, "threads": layout.threads}),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
                for _ in range(layout.processes)]
    try:
        for child in children:
            assert child.stdout is not None
            if not any(line.startswith(READY_MARK) for line in child.stdout):
                stdout, stderr = child.communicate()
                result_line(label, child.returncode, stdout, stderr)
        go = time.time()
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        ends = []
        for child in children:
            stdout, stderr = child.communicate()
            ends.append(result_line(label, child.returncode, stdout, stderr)["end"])
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    return layout.processes * spec["patches"] / (max(ends) - go)


# -- the benchmark -----------------------------------------------------------------------------
@dataclass
class BenchSlide:
    """A slide of the benchmark, tiled into the templates folder."""

    path: Path
    slide_id: str
    patches: int
    tiling_seconds: float


def tile_template(path: Path, slide_id: str, templates: Path) -> BenchSlide:
    """Tile ``path`` with the default settings into ``templates/<slide_id>``."""
    result = tile_slide(SlideEntry(path=path, slide_id=slide_id), load_config(None), templates)
    if result.status != "ok":
        raise SystemExit(f"{path}: tiling failed: {result.status} {result.error}")
    return BenchSlide(path, slide_id, result.patches, result.seconds)


def decoded_patches(path: Path, grid_folder: Path, count: int) -> np.ndarray:
    """The first ``count`` patches of the grid, decoded (repeated if it has fewer)."""
    grid = wsi.load_grid(grid_folder)
    coords = np.resize(grid.coords, (count, 2))
    with wsi.open_slide(path) as opened, wsi.PatchReader(opened, grid.spec) as reader:
        return reader.read_batch(coords)


def mib(size: int) -> str:
    """Bytes as MiB."""
    return f"{size / 2**20:.0f} MiB"


def loadavg() -> str:
    """The 1-minute load average (other work on the machine shows here)."""
    return f"{os.getloadavg()[0]:.2f}"


@dataclass
class BackboneResult:
    """(a), (b) and (c) of one backbone."""

    name: str
    run: SlideRun
    ceilings: list[tuple[Layout, float, float]]
    """(layout, patches/s, others' CPU share) of each (b), before and after (a) (before only
    with ``--quick``)."""
    clam: float
    """(c) patches/s."""

    def b_of(self, layout: Layout) -> float:
        """The mean of ``layout``'s (b) rates, leaving out one measured while other processes
        took more than ``NOISY_SHARE`` of the CPUs if another one was clean."""
        rates = [(rate, share) for measured, rate, share in self.ceilings if measured == layout]
        kept = [rate for rate, share in rates if share <= NOISY_SHARE] or [r for r, _ in rates]
        return sum(kept) / len(kept)

    @property
    def layouts(self) -> list[Layout]:
        """The layouts (b) was measured in, in order."""
        return list(dict.fromkeys(layout for layout, _, _ in self.ceilings))

    @property
    def b(self) -> float:
        """The ceiling: the faster layout."""
        return max(self.b_of(layout) for layout in self.layouts)


def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (any process), from /proc/stat."""
    with open("/proc/stat") as stat:
        user, nice, system, _, _, irq, softirq, steal = (
            int(v) for v in stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped descendants."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class Steps:
    """Times each step and how much of the machine other processes took meanwhile (the
    machine's busy CPU time minus this benchmark's, as a share of all cores)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, float, float]] = []

    def run(self, label: str, function: Callable[[], T]) -> T:
        print(f"{label}… (load {os.getloadavg()[0]:.2f})", flush=True)
        wall, busy, own = time.perf_counter(), cpu_busy_seconds(), own_cpu_seconds()
        result = function()
        wall = time.perf_counter() - wall
        others = (cpu_busy_seconds() - busy) - (own_cpu_seconds() - own)
        self.records.append((label, wall, max(0.0, others) / (wall * (os.cpu_count() or 1))))
        return result

    @property
    def last_share(self) -> float:
        """The others' share during the latest step."""
        return self.records[-1][2]

    @property
    def noisy(self) -> list[str]:
        """The steps during which others took more than ``NOISY_SHARE`` of the CPUs."""
        return [f"{label} ({share:.0%})" for label, _, share in self.records
                if share > NOISY_SHARE]


def ceiling_spec(name: str, pretrained: bool, small: BenchSlide, templates: Path,
                 patches: int) -> dict[str, Any]:
    """The (b) child's spec: ``patches`` decoded patches of ``small`` per process."""
    return {"mode": "ceiling", "backbone": name, "pretrained": pretrained,
            "slide": str(small.path), "grid": str(templates / small.slide_id),
            "patches": patches}


def measure_clam(name: str, pretrained: bool, small: BenchSlide, templates: Path, work: Path,
                 patches: int, steps: Steps) -> float:
    """(c) patches/s over ``patches`` CLAM-style coordinates of ``small``."""
    config = slidepipe_config(name, pretrained)
    grid = wsi.load_grid(templates / small.slide_id)
    coords = np.resize(clam_coords(small.path, grid.spec.read_size), (patches, 2))
    seconds = steps.run(f"{name}: (c) CLAM-style DataLoader, {patches} patches",
                        lambda: clam_seconds(config, small.path, coords, grid.spec.level,
                                             grid.spec.read_size, work))
    return patches / seconds


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0 (targets are reported, not enforced)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3072² and 6144² slides, 64 patches for (b) and (c), "
                             "efficientnet_lite0 only, (b) before (a) only")
    parser.add_argument("--backbone", choices=[name for name, _ in BACKBONES],
                        help="measure only this backbone")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))

    quick = args.quick
    sides = {"small": 3072, "large": 6144} if quick else {"small": 10240, "large": 40960}
    samples = {"efficientnet_lite0": 64} if quick else {"efficientnet_lite0": 512,
                                                        "resnet50_trunc": 256}
    samples = {name: count for name, count in samples.items()
               if args.backbone in (None, name)}
    cluster = ClusterConfig()
    workers = default_workers(cluster)
    cores = len(os.sched_getaffinity(0))
    worker_layout = Layout(workers, default_torch_threads(cluster, workers))
    layouts = list(dict.fromkeys([worker_layout, Layout(1, cores)]))
    torch.set_num_threads(cores)  # (c): CLAM leaves torch on every core
    cuda = torch.cuda.is_available()
    print(f"slidepipe extract benchmark — {machine()}, torch {torch.__version__}, "
          f"{'CUDA ' + torch.cuda.get_device_name(0) if cuda else 'no CUDA device'}; "
          f"LocalCluster of {workers} worker(s) x {worker_layout.threads} torch thread(s); "
          f"load {loadavg()}")
    started = time.perf_counter()
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="extract-bench-", dir=DATA_DIR))
    try:
        templates = work / "grids"
        warm = tile_template(real_svs(), WARMUP_ID, templates)
        by_side = {side: tile_template(resection_svs_of_side(side), f"resection-{side}",
                                       templates) for side in sorted(set(sides.values()))}
        slides = {size: by_side[side] for size, side in sides.items()}
        print("\nslides (default grid: 0.5 µm/px, 256 px; tiled beforehand, not in (a))")
        print_table(["slide", "patches", "tiling"],
                    [[s.slide_id, s.patches, f"{s.tiling_seconds:.1f} s"]
                     for s in [warm, *by_side.values()]])
        print()

        steps = Steps()

        def extract(label: str, name: str, pretrained: bool, slide: BenchSlide) -> SlideRun:
            return steps.run(f"{name}: (a) slidepipe on {warm.slide_id}, {slide.slide_id}",
                             lambda: run_slidepipe(label, name, pretrained, [
                                 (s.path, s.slide_id, s.patches) for s in (warm, slide)],
                                 work, templates))

        def ceilings(name: str, spec: dict[str, Any], when: str
                     ) -> list[tuple[Layout, float, float]]:
            return [(layout, steps.run(
                f"{name}: (b) ceiling {layout}, {spec['patches']} patches per process ({when})",
                lambda layout=layout: ceiling_rate(f"{name} ceiling", spec, layout)),
                steps.last_share) for layout in layouts]

        results: list[BackboneResult] = []
        rss_runs: list[tuple[BenchSlide, SlideRun]] = []
        for name, pretrained in BACKBONES:
            if name not in samples:
                continue
            small = slides["small"]
            clam = measure_clam(name, pretrained, small, templates, work,
                                max(64, samples[name] // 2), steps)
            spec = ceiling_spec(name, pretrained, small, templates, samples[name])
            measured = ceilings(name, spec, "before a")
            if name == "efficientnet_lite0":
                rss_runs.append((small, extract(f"{name} small", name, pretrained, small)))
            run = extract(f"{name} large", name, pretrained, slides["large"])
            if name == "efficientnet_lite0":
                rss_runs.append((slides["large"], run))
            if not quick:
                measured += ceilings(name, spec, "after a")
            results.append(BackboneResult(name, run, measured, clam))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, rss_runs, warm, cuda, steps)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load {loadavg()}")
    return 0


def report(results: list[BackboneResult], rss_runs: list[tuple[BenchSlide, SlideRun]],
           warm: BenchSlide, cuda: bool, steps: Steps) -> None:
    """Print the tables and the verdicts."""
    print("\nsteps: wall time, and the share of all cores that other processes (or the "
          "hypervisor's steal) took meanwhile")
    print_table(["step", "wall", "others"], [[label, f"{wall:.1f} s", f"{share:.0%}"]
                                             for label, wall, share in steps.records])
    runs = [*(run for _, run in rss_runs[:1]), *(r.run for r in results)]
    print(f"\n(a) slidepipe runs: a fresh process each, {warm.slide_id} ({warm.patches} "
          "patches) first, default config; seconds inside extract_archive unless noted")
    print_table(["run", "patches", "process + imports (not in a)", "extract_archive",
                 "all-in", "start-up", "steady", "tail"],
                [[r.label, r.patches, f"{r.imports:.1f} s", f"{r.wall:.1f} s",
                  f"{r.all_in:.1f}/s", f"{r.startup:.1f} s", f"{r.steady:.1f}/s",
                  f"{r.tail:.1f} s"] for r in runs])
    print("start-up: to the first chunk (the warm-up slide) minus its patches at the steady "
          "rate; tail: last chunk to return (finalise, export, cluster shutdown)")

    print("\npatches/s per backbone: (a) slidepipe all-in [steady]; (b) the backbone alone on "
          "decoded uint8 batches, per layout (processes x torch threads; before, after a; * = "
          "others took over 5 % of the CPUs), the ceiling is the faster layout; (c) CLAM-style "
          "DataLoader")
    rows = []
    for r in results:
        per_layout = "; ".join(
            f"{layout}: {r.b_of(layout):.1f} (" + ", ".join(
                f"{rate:.1f}" + ("*" if share > NOISY_SHARE else "")
                for measured, rate, share in r.ceilings if measured == layout) + ")"
            for layout in r.layouts)
        rows.append([r.name, r.run.patches, f"{r.run.all_in:.1f} [{r.run.steady:.1f}]",
                     per_layout, f"{r.b:.1f}", f"{r.clam:.1f}",
                     f"{r.run.all_in / r.b:.2f} [{r.run.steady / r.b:.2f}]",
                     f"{r.run.all_in / r.clam:.2f}", f"{r.clam / r.b:.2f}"])
    print_table(["backbone", "(a) patches", "(a) all-in [steady]", "(b) per layout",
                 "(b) ceiling", "(c) CLAM", "a/b [steady/b]", "a/c", "c/b"], rows)

    print()
    for name, _ in BACKBONES:
        if name not in {r.name for r in results}:
            print(f"----  a >= {TARGET_VS_CEILING:g} x b ({name}): not measured (--quick or "
                  "--backbone)")
    for r in results:
        verdict(f"a >= {TARGET_VS_CEILING:g} x b ({'GPU' if cuda else 'CPU'}, {r.name})",
                r.run.all_in >= TARGET_VS_CEILING * r.b,
                f"a/b = {r.run.all_in / r.b:.2f} all-in ({r.run.all_in:.1f} vs {r.b:.1f} "
                f"patches/s, {r.run.patches} patches; steady {r.run.steady / r.b:.2f}, "
                f"start-up {r.run.startup:.1f} s)")
        if cuda:
            verdict(f"a >= {TARGET_VS_CLAM_GPU:g} x c (GPU, {r.name})",
                    r.run.all_in >= TARGET_VS_CLAM_GPU * r.clam,
                    f"a/c = {r.run.all_in / r.clam:.2f} ({r.run.all_in:.1f} vs {r.clam:.1f} "
                    "patches/s)")
    if steps.noisy:
        print(f"WARN  other processes took over {NOISY_SHARE:.0%} of the CPUs during: "
              f"{'; '.join(steps.noisy)}. Figures from those steps are not clean (a (b) marked "
              "* is left out of its layout's mean when the other one is clean)")
    if not cuda:
        print(f"----  GPU targets (a >= {TARGET_VS_CEILING:g} x b, a >= {TARGET_VS_CLAM_GPU:g} "
              "x c on a GPU): not measured here (no CUDA device)")
    if rss_runs:
        report_rss(rss_runs)


def report_rss(rss_runs: list[tuple[BenchSlide, SlideRun]]) -> None:
    """Print the peak RSS table of the small and large slides' runs and its verdict."""
    print("\npeak RSS of the (a) processes (VmHWM; tree: polled peak of the summed RSS)")
    print_table(["run", "slide", "patches", "client (+ scheduler, nannies)", "largest worker",
                 "tree"],
                [[run.label, slide.slide_id, run.patches, mib(run.client_peak),
                  mib(run.worker_peak), mib(run.polled_tree)] for slide, run in rss_runs])
    (_, small_run), (_, large_run) = rss_runs
    growth = {"client": large_run.client_peak / small_run.client_peak,
              "worker": large_run.worker_peak / small_run.worker_peak}
    verdict(f"peak RSS does not grow with slide size (<= {TARGET_RSS_GROWTH:g} x)",
            all(value <= TARGET_RSS_GROWTH for value in growth.values()),
            f"{large_run.patches} vs {small_run.patches} patches: client "
            f"{mib(large_run.client_peak)} vs {mib(small_run.client_peak)} "
            f"({growth['client']:.2f}x), worker {mib(large_run.worker_peak)} vs "
            f"{mib(small_run.worker_peak)} ({growth['worker']:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
