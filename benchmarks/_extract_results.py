"""What ``benchmarks/extract.py`` measures and how it reports it: the layouts and windows of
(b), the ``extract_archive`` calls of (a), each backbone's result, the tables and the verdicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from _common import mib, print_table, verdict
from _processes import NOISY_SHARE, Steps

#: Targets.
TARGET_VS_CEILING = 0.9
TARGET_VS_CLAM_GPU = 2.0
TARGET_RSS_GROWTH = 1.10


@dataclass(frozen=True)
class Layout:
    """How the backbone's processes share the machine: ``processes`` x ``threads`` torch
    threads."""

    processes: int
    threads: int

    def __str__(self) -> str:
        return f"{self.processes}x{self.threads}"


@dataclass(frozen=True)
class Window:
    """One (b) window: its layout, patches/s, the share of the CPUs others took, and the CPU
    seconds its processes spent per patch."""

    layout: Layout
    rate: float
    others: float
    cpu_per_patch: float


@dataclass(frozen=True)
class CpuUse:
    """Where the machine's CPU time went during (a) calls, in CPU seconds: the workers' model
    threads (each worker's busiest live thread, the one its tasks run in), their decode threads
    (a task's decode threads end with it, so: the workers' time less their live threads'), the
    workers' other threads (event loop, heartbeats), the session's own process (client,
    scheduler, nannies), other processes (from /proc/stat), and idle; ``capacity`` is the
    cores times the wall time."""

    model: float
    decode: float
    workers_other: float
    session: float
    others: float
    idle: float
    capacity: float

    @classmethod
    def between(cls, before: dict[str, Any], after: dict[str, Any], cores: int) -> CpuUse:
        """The use between two snapshots (``workers``: each worker's
        ``_processes.thread_cpu_seconds()``; ``session``: the session process's CPU seconds;
        ``machine``: the machine's busy CPU seconds; ``wall``: a clock)."""
        model = decode = workers_other = 0.0
        for worker, (total, threads) in after["workers"].items():
            total_before, threads_before = before["workers"][worker]
            live = [cpu - threads_before.get(tid, 0.0) for tid, cpu in threads.items()]
            model += max(live)
            workers_other += sum(live) - max(live)
            decode += (total - total_before) - sum(live)
        session = after["session"] - before["session"]
        busy = after["machine"] - before["machine"]
        capacity = (after["wall"] - before["wall"]) * cores
        return cls(model, decode, workers_other, session,
                   others=max(0.0, busy - model - decode - workers_other - session),
                   idle=max(0.0, capacity - busy), capacity=capacity)

    def __add__(self, other: CpuUse) -> CpuUse:
        return CpuUse(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def shares(self) -> dict[str, float]:
        """Each use as a share of ``capacity``."""
        return {name: value / self.capacity for name, value in asdict(self).items()
                if name != "capacity"}


@dataclass
class SlideRun:
    """One ``extract_archive`` call: what it processed, when its chunks landed, and the memory
    peaks of its processes."""

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
    cpu: CpuUse | None = None
    """Where the machine's CPU went (session calls only)."""

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


@dataclass
class BenchSlide:
    """A slide of the benchmark, tiled into the templates folder."""

    path: Path
    slide_id: str
    patches: int
    tiling_seconds: float


@dataclass
class BackboneResult:
    """(a), (b) and (c) of one backbone."""

    name: str
    imports: float
    """Seconds from launching the session's process to starting its LocalCluster (not timed)."""
    cluster_start: float
    """Seconds to start slidepipe's LocalCluster in the session."""
    parts: list[SlideRun]
    """The session's ``extract_archive`` calls, one per part of the archive."""
    rounds: list[list[Window]]
    """The (b) windows before the first part and after each part."""
    clam: float
    """(c) patches/s."""

    @property
    def windows(self) -> list[Window]:
        return [window for windows in self.rounds for window in windows]

    def windows_of(self, layout: Layout) -> list[Window]:
        """``layout``'s windows."""
        return [window for window in self.windows if window.layout == layout]

    def kept_windows_of(self, layout: Layout) -> list[Window]:
        """``layout``'s windows, leaving out those taken while other processes took more than
        ``NOISY_SHARE`` of the CPUs when any other one is clean."""
        windows = self.windows_of(layout)
        return [window for window in windows if window.others <= NOISY_SHARE] or windows

    def rates_of(self, layout: Layout) -> list[float]:
        """The rates of ``layout``'s kept windows."""
        return [window.rate for window in self.kept_windows_of(layout)]

    def b_of(self, layout: Layout) -> float:
        """The mean of ``layout``'s window rates."""
        rates = self.rates_of(layout)
        return sum(rates) / len(rates)

    @property
    def layouts(self) -> list[Layout]:
        """The layouts (b) was measured in, in order."""
        return list(dict.fromkeys(window.layout for window in self.windows))

    @property
    def ceiling_layout(self) -> Layout:
        """The faster layout."""
        return max(self.layouts, key=self.b_of)

    @property
    def b(self) -> float:
        """The ceiling: the faster layout's rate."""
        return self.b_of(self.ceiling_layout)

    @property
    def b_cpu_per_patch(self) -> float:
        """The mean CPU seconds per patch of the ceiling layout's kept windows."""
        kept = self.kept_windows_of(self.ceiling_layout)
        return sum(window.cpu_per_patch for window in kept) / len(kept)

    @property
    def cpu(self) -> CpuUse | None:
        """Where the CPU went during all the calls (None when a call was not accounted)."""
        uses = [part.cpu for part in self.parts if part.cpu is not None]
        if not uses or len(uses) < len(self.parts):
            return None
        return sum(uses[1:], start=uses[0])

    @property
    def patches(self) -> int:
        return sum(part.patches for part in self.parts)

    @property
    def wall(self) -> float:
        """The cluster's start plus every ``extract_archive`` call."""
        return self.cluster_start + sum(part.wall for part in self.parts)

    @property
    def all_in(self) -> float:
        """(a): all patches over the cluster's start and every call."""
        return self.patches / self.wall

    def b_around(self, part: int) -> float:
        """The ceiling of the windows just before and just after part ``part``."""
        return sum(max(window.rate for window in self.rounds[index])
                   for index in (part, part + 1)) / 2

    @property
    def per_call(self) -> list[float]:
        """Each call's a/b against the windows just before and just after it."""
        return [part.all_in / self.b_around(index) for index, part in enumerate(self.parts)]


def report(results: list[BackboneResult], rss_runs: list[tuple[BenchSlide, SlideRun]],
           warm: BenchSlide, cuda: bool, steps: Steps, backbones: list[str]) -> None:
    """Print the tables and the verdicts (``backbones``: every backbone the benchmark knows,
    so those left out are said to be)."""
    print("\nsteps: wall time, and the share of all cores that other processes (or the "
          "hypervisor's steal) took meanwhile")
    print_table(["step", "wall", "others"], [[label, f"{wall:.1f} s", f"{share:.0%}"]
                                             for label, wall, share in steps.records])
    if rss_runs:
        print("\n(a) fresh slidepipe runs, one extract_archive call each (the RSS comparison): "
              f"{warm.slide_id} ({warm.patches} patches) first, default config; seconds inside "
              "extract_archive unless noted")
        print_table(["run", "patches", "process + imports (not timed)", "extract_archive",
                     "all-in", "start-up", "steady", "tail"],
                    [[r.label, r.patches, f"{r.imports:.1f} s", f"{r.wall:.1f} s",
                      f"{r.all_in:.1f}/s", f"{r.startup:.1f} s", f"{r.steady:.1f}/s",
                      f"{r.tail:.1f} s"] for _, r in rss_runs])
        print("start-up: to the first chunk (the warm-up slide) minus its patches at the "
              "steady rate; tail: last chunk to return (finalise, export, cluster shutdown)")

    for r in results:
        print(f"\n(a) {r.name}: the session's process started and imported in {r.imports:.1f} s "
              f"(not timed), slidepipe's LocalCluster started in {r.cluster_start:.1f} s, "
              f"then the archive in {len(r.parts)} extract_archive calls on it; (b) the "
              "ceiling of the windows just before and just after each call")
        print_table(["call", "slides", "patches", "extract_archive", "all-in", "(b) around",
                     "a/b"],
                    [[index, ", ".join(slide_id for slide_id, _ in part.slides), part.patches,
                      f"{part.wall:.1f} s", f"{part.all_in:.1f}/s",
                      f"{r.b_around(index - 1):.1f}/s", f"{ratio:.2f}"]
                     for index, (part, ratio) in enumerate(zip(r.parts, r.per_call,
                                                               strict=True), start=1)])

    report_cpu(results)

    print("\npatches/s per backbone: (a) slidepipe all-in: all the calls' patches over the "
          "cluster's start and every call; (b) the backbone alone on decoded uint8 batches, in "
          "windows while slidepipe's processes were frozen, per layout (processes x torch "
          "threads): mean of the windows (count, min-max; * = windows during which others took "
          "over 5 % of the CPUs, left out of the mean); the ceiling is the faster layout; (c) "
          "CLAM-style DataLoader")
    rows = []
    for r in results:
        per_layout = []
        for layout in r.layouts:
            windows = r.windows_of(layout)
            rates = [window.rate for window in windows]
            noisy = sum(window.others > NOISY_SHARE for window in windows)
            per_layout.append(f"{layout}: {r.b_of(layout):.1f} ({len(rates)}, "
                              f"{min(rates):.1f}-{max(rates):.1f}" +
                              (f", {noisy}*" if noisy else "") + ")")
        rows.append([r.name, r.patches, f"{r.all_in:.1f}", "; ".join(per_layout),
                     f"{r.b:.1f}", f"{r.clam:.1f}", f"{r.all_in / r.b:.2f}",
                     f"{r.all_in / r.clam:.2f}", f"{r.clam / r.b:.2f}"])
    print_table(["backbone", "(a) patches", "(a) all-in", "(b) per layout", "(b) ceiling",
                 "(c) CLAM", "a/b", "a/c", "c/b"], rows)

    print()
    for name in backbones:
        if name not in {r.name for r in results}:
            print(f"----  a >= {TARGET_VS_CEILING:g} x b ({name}): not measured (--quick or "
                  "--backbone)")
    for r in results:
        verdict(f"a >= {TARGET_VS_CEILING:g} x b ({'GPU' if cuda else 'CPU'}, {r.name})",
                r.all_in >= TARGET_VS_CEILING * r.b,
                f"a/b = {r.all_in / r.b:.2f} all-in ({r.all_in:.1f} vs {r.b:.1f} patches/s, "
                f"{r.patches} patches in {len(r.parts)} calls; cluster start "
                f"{r.cluster_start:.1f} s; per call " +
                ", ".join(f"{ratio:.2f}" for ratio in r.per_call) + ")")
        if cuda:
            verdict(f"a >= {TARGET_VS_CLAM_GPU:g} x c (GPU, {r.name})",
                    r.all_in >= TARGET_VS_CLAM_GPU * r.clam,
                    f"a/c = {r.all_in / r.clam:.2f} ({r.all_in:.1f} vs {r.clam:.1f} patches/s)")
    if steps.noisy:
        print(f"WARN  other processes took over {NOISY_SHARE:.0%} of the CPUs during: "
              f"{'; '.join(steps.noisy)}. Figures from those steps are not clean")
    if not cuda:
        print(f"----  GPU targets (a >= {TARGET_VS_CEILING:g} x b, a >= {TARGET_VS_CLAM_GPU:g} "
              "x c on a GPU): not measured here (no CUDA device)")
    if rss_runs:
        report_rss(rss_runs)


def report_cpu(results: list[BackboneResult]) -> None:
    """Print where the cores went during each backbone's (a) calls, and a/b of the calls split
    into the share of the cores the model got against (b)'s, and the model's CPU time per patch
    in (b) against (a) (the machine's drift between the windows and the calls shows here)."""
    accounted = [(r, r.cpu) for r in results if r.cpu is not None]
    if not accounted:
        return
    names = ["model", "decode", "workers_other", "session", "others", "idle"]
    print("\nwhere the cores went during the (a) calls (CPU time from /proc, shares of cores x "
          "wall): model = each worker's task thread (the backbone, its preprocessing, the "
          "chunk's write); decode = the workers' ended threads (a task's decode threads); "
          "workers' other threads; the session process (client, scheduler, nannies); other "
          "processes; idle. Then a/b of the calls = (the model's share of the cores in (a) / "
          "(b)'s processes' share in its ceiling windows) x ((b)'s CPU per patch / (a)'s model "
          "CPU per patch)")
    rows = []
    for r, use in accounted:
        shares = use.shares()
        cores = use.capacity / sum(part.wall for part in r.parts)
        a_cpu = use.model / r.patches
        b_share = r.b * r.b_cpu_per_patch / cores
        calls = r.patches / sum(part.wall for part in r.parts)
        rows.append([r.name, *(f"{shares[name]:.1%}" for name in names),
                     f"{a_cpu * 1e3:.1f} ms", f"{r.b_cpu_per_patch * 1e3:.1f} ms",
                     f"{calls / r.b:.3f} = {shares['model'] / b_share:.3f} x "
                     f"{r.b_cpu_per_patch / a_cpu:.3f}"])
    print_table(["backbone", "model", "decode", "workers' other", "session", "others", "idle",
                 "(a) model CPU/patch", "(b) CPU/patch", "calls' a/b = share x speed"], rows)


def report_rss(rss_runs: list[tuple[BenchSlide, SlideRun]]) -> None:
    """Print the peak RSS table of the small and large slides' runs and its verdict, which
    compares each size's highest peaks."""
    print("\npeak RSS of the (a) processes (VmHWM; tree: polled peak of the summed RSS)")
    print_table(["run", "slide", "patches", "client (+ scheduler, nannies)", "largest worker",
                 "tree"],
                [[run.label, slide.slide_id, run.patches, mib(run.client_peak),
                  mib(run.worker_peak), mib(run.polled_tree)] for slide, run in rss_runs])
    by_slide: dict[str, list[SlideRun]] = {}
    for slide, run in rss_runs:
        by_slide.setdefault(slide.slide_id, []).append(run)
    small_runs, large_runs = by_slide.values()

    def peaks(runs: list[SlideRun]) -> dict[str, int]:
        return {"client": max(run.client_peak for run in runs),
                "worker": max(run.worker_peak for run in runs)}

    small, large = peaks(small_runs), peaks(large_runs)
    growth = {process: large[process] / small[process] for process in small}
    verdict(f"peak RSS does not grow with slide size (<= {TARGET_RSS_GROWTH:g} x; each size's "
            f"highest of {len(small_runs)} runs)",
            all(value <= TARGET_RSS_GROWTH for value in growth.values()),
            f"{large_runs[0].patches} vs {small_runs[0].patches} patches: " +
            ", ".join(f"{process} {mib(large[process])} vs {mib(small[process])} "
                      f"({growth[process]:.2f}x)" for process in small))
