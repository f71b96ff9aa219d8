"""Feature extraction throughput: slidepipe end to end against the backbone alone and CLAM's way.

Run ``.venv/bin/python benchmarks/extract.py`` (``--quick`` for a smoke run).

Patches/s for each backbone, the default ``efficientnet_lite0`` (embedded ImageNet weights) and
``resnet50_trunc`` (``pretrained: false``: offline there are no ImageNet weights for it, and
random weights run at the same speed), three ways:

(a) slidepipe end to end, with the default configuration (on a CPU-only machine a LocalCluster
    of one single-threaded model worker per core, ADR 0005; on CPU batches of 16 and chunks of
    128 patches, 2 decode threads per task, float16 zarr store plus the HDF5 export). The grids
    are made beforehand by ``tile_slide`` and copied in, so (a) measures extraction, not tiling.
    A fresh process (the session), started as the ``slidepipe`` console script starts
    ``slidepipe extract`` (the workers' forkserver first, importing beside the process's own
    imports; ``pipelines.launch``, ``_extract_child.py``), starts slidepipe's LocalCluster
    exactly as ``extract_archive`` does (``pipelines.cluster.dask_client``) and then extracts an
    archive in 3 ``extract_archive`` calls on that cluster, as ``--scheduler`` runs do: the
    real CMU-1-Small-Region (54 patches) with the 20480² resection, then the 20480² resection
    twice more (9126 patches in all, as much as a large resection). Each call pays its own
    client-side backbone load, planning, slide preparation, every chunk, finalising and the
    HDF5 export; the workers load the model in the first call. The all-in rate is all the
    calls' patches over the cluster's start plus the calls' time (the process start and imports
    before it are shown, not counted); it is the figure the targets use.
(b) the ceiling: the same ``Embedder`` on real patches of the slide already decoded into one
    uint8 array (cycled), fed in batches of the same size, in processes started and warmed
    beforehand, idle (blocked on stdin) while slidepipe runs: as many at once as slidepipe has
    model workers, each with a worker's torch threads, and, where that layout is not one
    process using every core, that one too. Before the first call and after each, the whole
    session is frozen (``SIGSTOP`` to its process group: client, scheduler, nannies, workers;
    it runs in a session of its own) and each layout gets one window (the layouts take turns
    going first, from one round to the next): every process of the
    layout runs batches until 12 s have passed, and the window's rate is the sum of theirs
    (each its patches over its own time, the last batch included). A layout's rate is the mean
    of its windows (leaving out those during which other processes took over 5 % of the CPUs,
    if any other is clean), and the ceiling is the faster layout: the best the backbone alone
    does on this machine. Each call is also shown against the windows just before and after
    it. Why windows between calls: on the shared 2-core VM of these figures the backbone's
    speed drifts by up to 40 % between measurements minutes apart (invisible in /proc/stat: no
    steal, no other process), so a ceiling measured once before or after a 4-9 minute run says
    little about the minutes the run had; interleaved, (a) and (b) sample the same minutes. The
    session is frozen only while idle between calls. (Freezing one fresh run mid-call instead,
    tried first, gave (a) 0.6-0.7 of the windows between, while the same code on a warm cluster
    ran at 0.95-1.05 of windows taken the way they are here: a run frozen with tasks in flight
    is not the run a user has.)
(c) CLAM's extractor, re-implemented: a ``torch.utils.data.DataLoader`` over a
    ``Whole_Slide_Bag_FP``-style dataset. Coordinates come from an HDF5 file made CLAM's way:
    its segmentation at the level nearest 64x (``tiling.clam_segment``, with ``a_t = 1`` so
    small slides keep their tissue), then per contour every ``patch`` step from the contour's
    bounding-box corner (so NOT on the slide's tile grid), x-major as ``np.meshgrid(...,
    indexing="ij")`` orders them, kept by the ``four_pt`` test. Each item reads its coordinate
    from the HDF5 file, then ``openslide.OpenSlide.read_region(...).convert("RGB")``, then
    torchvision ``Resize(input size)``, ``ToTensor()``, ``Normalize(mean, std)``. The model is
    the same backbone in CLAM's form (fp32, NCHW, not channels-last), run under
    ``torch.inference_mode()`` with torch on every core, in batches of the size (a) uses (CLAM's
    own default of 256 would be slower on a CPU); features are appended to an HDF5 file per
    batch. ``num_workers`` as CLAM sets it: 0 without CUDA, 8 (with ``pin_memory``) with
    CUDA. Model load and patching are not timed.

Peak RSS: four more (a) runs of efficientnet_lite0, each one ``extract_archive`` call in a
fresh process started like the session (LocalCluster and all, the way ``slidepipe extract``
runs): the 54-patch warm-up slide then a small (10240², 768 patches) or a 16x larger (40960²,
11 888 patches, the representative resection of benchmarks/README.md) resection-like slide,
each size twice, in turns; a size's peak is the higher of its two runs, because a worker's
peak moves by up to ±10 % between runs of the same slide (mostly in its first 1.5 s, as the
model and the first batches settle glibc's arena, ADR 0004; see benchmarks/README.md);
``VmHWM`` from /proc (exact high-water marks) of the client process, which also runs the
scheduler and the nannies, read when ``extract_archive`` returns, and of its descendants (the
largest worker), polled every 0.2 s with the peak of the tree's summed RSS. (``getrusage``
would not do: ``ru_maxrss`` keeps the parent's high-water mark across fork and exec.) Their
rates, start-up (time to the first chunk minus its patches at the steady rate) and tail are
shown too.

Slides: ``tests.builders.build_resection_svs`` at 10240², 20480² (3024 patches) and 40960²,
cached in ``benchmarks/_data/``; real tissue, Aperio JPEG Q=70. (b) cycles through 512 / 256
patches of the 10240² slide per process, (c) runs half as many.

Every step also reports the share of the CPUs that other processes (or the hypervisor) took
meanwhile, from /proc/stat minus this benchmark's own CPU time; a warning is printed above 5 %.

Where the cores went during the session's calls, from /proc (CPU time, unlike patches/s, does
not drift with the VM): each worker's task thread (the backbone, its preprocessing and the
chunk writes), its decode threads (they end with their task, so: the worker's CPU time less its
live threads'), its other threads, the session's own process (client, scheduler, nannies),
other processes and idle, as shares of the cores times the calls' wall time. The calls' a/b is
then split into two factors: the task threads' share of the cores against (b)'s processes'
share in the ceiling's windows (what (a) spends on other things than the model, and leaves
idle), and (b)'s CPU seconds per patch against (a)'s task threads' (how fast the model ran per
CPU second in the calls against the windows: the VM's drift shows here).

Targets: on a CPU, (a) ≥ 0.9 x (b) for both backbones; on a GPU (only when
``torch.cuda.is_available()``), (a) ≥ 0.9 x (b) and (a) ≥ 2 x (c); peak RSS of client and worker
on the larger slide within 10 % of the smaller one. ``--quick``: 3072² and 6144² slides, 64
patches, 3 s windows, efficientnet_lite0 only (about 2 minutes; a smoke run, its slides are too
small for meaningful ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _clam_extractor import clam_coords, clam_seconds
from _common import DATA_DIR, machine, print_table, real_svs, resection_svs_of_side
from _extract_modes import READY_MARK, RESULT_MARK, slidepipe_config
from _extract_results import (
    BackboneResult,
    BenchSlide,
    CpuUse,
    Layout,
    SlideRun,
    Window,
    report,
)
from _processes import (
    Conversation,
    Steps,
    child_failed,
    frozen,
    loadavg,
    measured,
)

import wsi
from pipelines.cluster import ClusterConfig, default_torch_threads, default_workers
from pipelines.config import load_config
from pipelines.discovery import SlideEntry
from pipelines.tile import tile_slide

#: Fresh runs per slide size for the peak RSS comparison.
RSS_REPEATS = 2
#: Seconds of one (b) window (``--quick``: 3).
WINDOW_SECONDS = 12.0
#: The session's archive: this many calls, the first one with the warm-up slide.
PARTS = 3

#: The backbones measured: (name, pretrained).
BACKBONES = (("efficientnet_lite0", True), ("resnet50_trunc", False))

WARMUP_ID = "CMU-1-Small-Region"


# -- (b) the ceiling, and the processes the benchmark talks to ---------------------------------
def child_command(spec: dict[str, Any]) -> list[str]:
    """The command starting the child process ``spec`` describes (``_extract_child.py``)."""
    return [sys.executable, str(Path(__file__).with_name("_extract_child.py")), json.dumps(spec)]


class CeilingPool:
    """The warm (b) processes of one layout, idle (blocked on stdin) between windows."""

    def __init__(self, label: str, spec: dict[str, Any], layout: Layout) -> None:
        self.layout = layout
        self.processes = [Conversation(f"{label} (b) {layout}",
                                       child_command({**spec, "threads": layout.threads}))
                          for _ in range(layout.processes)]
        for process in self.processes:
            process.read_until(READY_MARK)

    def window(self, seconds: float) -> tuple[float, float]:
        """Patches/s of all the processes, started together, each running batches until
        ``seconds`` have passed (the sum of their rates: each rate counts its last batch's
        patches and time), and their CPU seconds per patch."""
        for process in self.processes:
            process.send(str(seconds))
        reports = [json.loads(process.read_until(RESULT_MARK)) for process in self.processes]
        return (sum(report["patches"] / report["seconds"] for report in reports),
                sum(report["cpu"] for report in reports)
                / sum(report["patches"] for report in reports))

    def close(self) -> None:
        """End the processes."""
        for process in self.processes:
            process.close()


def extraction_spec(label: str, slides: list[BenchSlide], work: Path, templates: Path
                    ) -> dict[str, Any]:
    """The entries and output folder of one extraction, the slides' grids copied from
    ``templates`` into the folder."""
    out = work / label
    out.mkdir(parents=True)
    for slide in slides:
        if not (out / slide.slide_id).exists():
            shutil.copytree(templates / slide.slide_id, out / slide.slide_id)
    return {"out": str(out), "entries": [[str(s.path), s.slide_id] for s in slides]}


def slide_run(label: str, backbone: str, slides: list[BenchSlide], launched: float,
              report: dict[str, Any]) -> SlideRun:
    """The :class:`SlideRun` of an extraction's report; exits if a slide failed."""
    failed = [r for r in report["results"] if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"{label}: slides not extracted: {failed}")
    chunks: list[tuple[float, int]] = []
    done_by_slide: dict[str, int] = {}
    for when, slide_id, done_patches in sorted(report["marks"]):
        chunks.append((when, done_patches - done_by_slide.get(slide_id, 0)))
        done_by_slide[slide_id] = done_patches
    patches = [r["patches"] for r in report["results"]]
    assert sum(done_by_slide.values()) == sum(patches), (done_by_slide, patches)
    return SlideRun(label, backbone, [(s.slide_id, s.patches) for s in slides], launched,
                    report["start"], report["end"], chunks, report.get("client_peak", 0),
                    report.get("worker_peak", 0), report.get("polled_tree", 0),
                    CpuUse(**report["cpu"]) if "cpu" in report else None)


def run_slidepipe(label: str, backbone: str, pretrained: bool, slides: list[BenchSlide],
                  work: Path, templates: Path) -> SlideRun:
    """One ``extract_archive`` call in a fresh process, LocalCluster and all."""
    spec = {"mode": "extract", "backbone": backbone, "pretrained": pretrained,
            **extraction_spec(label, slides, work, templates)}
    launched = time.time()
    done = subprocess.run(child_command(spec), capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        raise child_failed(label, done.returncode, done.stdout, done.stderr)
    shutil.rmtree(spec["out"])
    return slide_run(label, backbone, slides, launched, json.loads(lines[-1][len(RESULT_MARK):]))


class SlidepipeSession:
    """slidepipe's LocalCluster, started in a fresh process and kept: the archive's parts are
    extracted on it one call at a time (``extract_archive`` on the running scheduler, as
    ``--scheduler`` does), with (b) windows between the calls while the whole process group is
    frozen."""

    def __init__(self, label: str, backbone: str, pretrained: bool) -> None:
        self.label = label
        self.backbone = backbone
        launched = time.time()
        self.process = Conversation(label, child_command({
            "mode": "session", "backbone": backbone, "pretrained": pretrained}), new_session=True)
        ready = json.loads(self.process.read_until(READY_MARK))
        self.imports = ready["start"] - launched
        self.cluster_start = ready["ready"] - ready["start"]

    def extract(self, label: str, slides: list[BenchSlide], work: Path, templates: Path
                ) -> SlideRun:
        """One ``extract_archive`` call over ``slides`` on the session's cluster."""
        spec = extraction_spec(label, slides, work, templates)
        start = time.time()
        self.process.send(json.dumps(spec))
        report = json.loads(self.process.read_until(RESULT_MARK))
        shutil.rmtree(spec["out"])
        return slide_run(label, self.backbone, slides, start, report)

    def frozen(self) -> AbstractContextManager[None]:
        """The session's processes stopped inside the block."""
        return frozen(self.process.child.pid)

    def close(self) -> None:
        """Close the cluster and end the process."""
        self.process.close()


# -- the benchmark -----------------------------------------------------------------------------
def tile_template(path: Path, slide_id: str, templates: Path) -> BenchSlide:
    """Tile ``path`` with the default settings into ``templates/<slide_id>``."""
    result = tile_slide(SlideEntry(path=path, slide_id=slide_id), load_config(None), templates)
    if result.status != "ok":
        raise SystemExit(f"{path}: tiling failed: {result.status} {result.error}")
    return BenchSlide(path, slide_id, result.patches, result.seconds)


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


def measure_session(name: str, pretrained: bool, spec: dict[str, Any], layouts: list[Layout],
                    parts: list[list[BenchSlide]], window_seconds: float, work: Path,
                    templates: Path, steps: Steps, clam: float) -> BackboneResult:
    """(a) and (b) of one backbone: a slidepipe session extracting ``parts`` one call each, with
    a round of (b) windows (one per layout, the session frozen) before the first call and after
    each."""
    session = steps.run(f"{name}: (a) starting slidepipe's LocalCluster in a fresh process",
                        lambda: SlidepipeSession(name, name, pretrained))
    try:
        pools = steps.run(f"{name}: (b) warming {', '.join(map(str, layouts))} processes, "
                          f"{spec['patches']} patches each",
                          lambda: [CeilingPool(name, spec, layout) for layout in layouts])
        try:
            def windows(round_index: int) -> list[Window]:
                """One window per layout, in turn first and last from one round to the next."""
                taken = []
                with session.frozen():
                    for pool in pools if round_index % 2 == 0 else pools[::-1]:
                        (rate, cpu_per_patch), _, others = measured(
                            lambda pool=pool: pool.window(window_seconds))
                        taken.append(Window(pool.layout, rate, others, cpu_per_patch))
                return taken

            rounds = [windows(0)]
            runs = []
            for index, slides in enumerate(parts, start=1):
                label = f"{name}-part{index}"
                runs.append(steps.run(
                    f"{name}: (a) call {index}/{len(parts)}: "
                    f"{', '.join(slide.slide_id for slide in slides)}",
                    lambda label=label, slides=slides: session.extract(label, slides, work,
                                                                        templates)))
                rounds.append(windows(index))
        finally:
            for pool in pools:
                pool.close()
    finally:
        session.close()
    return BackboneResult(name, session.imports, session.cluster_start, runs, rounds, clam)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0 (targets are reported, not enforced)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3072² and 6144² slides, 64 patches for (b) and (c), "
                             "3 s windows, efficientnet_lite0 only")
    parser.add_argument("--backbone", choices=[name for name, _ in BACKBONES],
                        help="measure only this backbone")
    args = parser.parse_args(argv)

    quick = args.quick
    sides = ({"small": 3072, "large": 6144, "part": 6144} if quick else
             {"small": 10240, "large": 40960, "part": 20480})
    window_seconds = 3.0 if quick else WINDOW_SECONDS
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

        def fresh_run(label: str, name: str, pretrained: bool, slide: BenchSlide) -> SlideRun:
            return steps.run(f"{name}: (a) one fresh slidepipe run on {warm.slide_id}, "
                             f"{slide.slide_id}",
                             lambda: run_slidepipe(label, name, pretrained, [warm, slide],
                                                   work, templates))

        results: list[BackboneResult] = []
        rss_runs: list[tuple[BenchSlide, SlideRun]] = []
        part = slides["part"]
        parts = [[warm, part], *[[part]] * (PARTS - 1)]
        for name, pretrained in BACKBONES:
            if name not in samples:
                continue
            small = slides["small"]
            clam = measure_clam(name, pretrained, small, templates, work,
                                max(64, samples[name] // 2), steps)
            if name == "efficientnet_lite0":
                rss_runs = [(slide, fresh_run(f"{name}-{size}-{repeat}", name, pretrained,
                                              slide))
                            for repeat in range(1, RSS_REPEATS + 1)
                            for size, slide in (("small", small), ("large", slides["large"]))]
            spec = ceiling_spec(name, pretrained, small, templates, samples[name])
            results.append(measure_session(name, pretrained, spec, layouts, parts,
                                           window_seconds, work, templates, steps, clam))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, rss_runs, warm, cuda, steps, [name for name, _ in BACKBONES])
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
