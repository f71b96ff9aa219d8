"""What the child processes of ``benchmarks/extract.py`` do (started by ``_extract_child.py``):
a warm (b) process, a slidepipe session, or one fresh extraction. Each prints its figures as
JSON lines marked ``RESULT_MARK`` (and ``READY_MARK`` once it waits for work on stdin)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import peak_rss
from _extract_results import CpuUse
from _processes import TreeSampler, cpu_busy_seconds, reap_forkserver, thread_cpu_seconds
from distributed import Client

import wsi
from pipelines.backbones import load_backbone
from pipelines.cluster import dask_client
from pipelines.config import SlidepipeConfig, load_config
from pipelines.discovery import SlideEntry
from pipelines.extract import extract_archive
from pipelines.inference import Embedder

RESULT_MARK = "EXTRACT-BENCH-RESULT "
READY_MARK = "EXTRACT-BENCH-READY"


def slidepipe_config(backbone: str, pretrained: bool, scheduler: str | None = None
                     ) -> SlidepipeConfig:
    """The default configuration with only the backbone (and an existing cluster's scheduler)
    chosen."""
    return load_config(None, {"backbone": {"name": backbone, "pretrained": pretrained},
                              "cluster": {"scheduler": scheduler}})


def child_main(spec: dict[str, Any]) -> int:
    """Run the child ``spec["mode"]`` names: ``ceiling``, ``session`` or ``extract``."""
    modes = {"ceiling": run_ceiling, "session": run_session, "extract": run_extraction}
    modes[spec["mode"]](spec)
    return 0


def run_ceiling(spec: dict[str, Any]) -> None:
    """One (b) process: print ``READY_MARK`` once warm, then for each line on stdin (a window's
    length in seconds) run batches of decoded patches until that long has passed and print how
    many patches it embedded, in how long and with how much CPU time."""
    config = slidepipe_config(spec["backbone"], spec["pretrained"])
    torch.set_num_threads(spec["threads"])
    patches = decoded_patches(Path(spec["slide"]), Path(spec["grid"]), spec["patches"])
    embedder = Embedder(load_backbone(config.backbone))
    batch = embedder.backbone.batch_size
    embedder(patches[:batch])
    print(READY_MARK, flush=True)
    while line := sys.stdin.readline():
        seconds, done, start, cpu = float(line), 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            first = done % len(patches)
            embedder(patches[first:first + batch])
            done += len(patches[first:first + batch])
        print(RESULT_MARK + json.dumps({"patches": done, "seconds": time.perf_counter() - start,
                                        "cpu": time.process_time() - cpu}), flush=True)


def run_session(spec: dict[str, Any]) -> None:
    """Start slidepipe's LocalCluster, print ``READY_MARK`` with its start, then run one
    ``extract_archive`` on it per line on stdin (the entries and output folder) and print its
    report with where the CPU went."""
    start = time.time()
    config = slidepipe_config(spec["backbone"], spec["pretrained"])
    with dask_client(config.cluster, announce=lambda _: None) as client:
        ready = time.time()
        on_cluster = slidepipe_config(spec["backbone"], spec["pretrained"],
                                      scheduler=client.scheduler.address)
        print(READY_MARK + json.dumps({"start": start, "ready": ready}), flush=True)
        while line := sys.stdin.readline():
            command = json.loads(line)
            before = cpu_snapshot(client)
            report = extraction_report(on_cluster, command["entries"], command["out"])
            report["cpu"] = asdict(CpuUse.between(before, cpu_snapshot(client),
                                                  len(os.sched_getaffinity(0))))
            print(RESULT_MARK + json.dumps(report), flush=True)


def run_extraction(spec: dict[str, Any]) -> None:
    """One ``extract_archive`` call, LocalCluster and all; print its report with the memory
    peaks of this process and of its descendants."""
    sampler = TreeSampler()
    sampler.start()
    report = extraction_report(slidepipe_config(spec["backbone"], spec["pretrained"]),
                               spec["entries"], spec["out"])
    reap_forkserver()
    sampler.stop()
    report.update(client_peak=peak_rss(), worker_peak=max(sampler.peaks.values(), default=0),
                  polled_tree=sampler.tree)
    print(RESULT_MARK + json.dumps(report), flush=True)


def cpu_snapshot(client: Client) -> dict[str, Any]:
    """The CPU seconds so far of each worker and its live threads, of this process, and of the
    machine, and the time (for :meth:`CpuUse.between`)."""
    return {"workers": client.run(thread_cpu_seconds), "session": thread_cpu_seconds()[0],
            "machine": cpu_busy_seconds(), "wall": time.perf_counter()}


def extraction_report(config: SlidepipeConfig, entries: list[list[str]], out: str
                      ) -> dict[str, Any]:
    """``extract_archive`` over ``entries`` ([path, slide_id]): its start and end, when each
    chunk landed and each slide's result."""
    marks: list[tuple[float, str, int]] = []

    def progress(slide_id: str, done: int, total: int) -> None:
        marks.append((time.time(), slide_id, done))

    start = time.time()
    results = extract_archive([SlideEntry(path=Path(path), slide_id=slide_id)
                               for path, slide_id in entries], config, Path(out),
                              on_progress=progress)
    return {"start": start, "end": time.time(), "marks": marks,
            "results": [{"slide_id": r.slide_id, "status": r.status, "patches": r.patches,
                         "error": r.error} for r in results]}


def decoded_patches(path: Path, grid_folder: Path, count: int) -> np.ndarray:
    """The first ``count`` patches of the grid, decoded (repeated if it has fewer)."""
    grid = wsi.load_grid(grid_folder)
    coords = np.resize(grid.coords, (count, 2))
    with wsi.open_slide(path) as opened, wsi.PatchReader(opened, grid.spec) as reader:
        return reader.read_batch(coords)
