"""``slidepipe run`` over the demo cohort: slides per hour, and what a second Dask worker buys.

Run ``.venv/bin/python benchmarks/run.py`` (``--slides 6 --size 3072`` for a smoke run).

The cohort is the demo's (:func:`pipelines.demo.generate_demo_cohort`: 16 synthetic H&E-like
slides of 6144 x 6144 px at 0.5 µm/px, half with lesions), generated once into
``benchmarks/_data/demo/``. Every configuration runs into a fresh output folder, in the same
process, through :func:`pipelines.run.runner.run_archive`, timed from the call to its return (the
LocalCluster's start included):

- the CPU-bound stages (``tile``, ``extract`` with the embedded EfficientNet-Lite0 on the CPU)
  with **1 Dask worker** and with **2 Dask workers**, each worker one process with one torch
  thread, so the ratio says how well the graph spreads slides over workers (target: 2 workers
  at least 1.7x as fast as 1). The target is judged on the stages' own time, the run report's
  ``flow_seconds``: from the moment the cluster is up to the last slide (the workers' imports
  and model loads included). The run's wall time adds a fixed start (inventory and hashing,
  the client's backbone identity, the LocalCluster's start: about 5 s), shown beside it. One
  worker using every core for torch (the CPU default before ADR 0005, which made it one
  single-threaded worker per core) is shown for information;
- the whole pipeline's throughput in slides per hour: the CPU-bound stages above plus
  ``predict`` and ``export`` (heatmaps and the HTML worklist) with an ABMIL model trained here
  on the 2-worker run's features (3 folds, a few epochs; its quality does not matter).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import DATA_DIR, machine, print_table, verdict

from pipelines.demo import DEMO_SIZE, DEMO_SLIDES, generate_demo_cohort
from pipelines.mil_run import MILRunConfig, train_run
from pipelines.run.config import RunConfig
from pipelines.run.runner import run_archive

TARGET_SPEEDUP = 1.7
CPU_STAGES = ["tile", "extract"]


def _run(labels: Path, out: Path, cluster: dict[str, Any], **extra: Any) -> tuple[float, dict]:
    """(wall seconds, report.json) of one run."""
    config = RunConfig.model_validate({"archive": [labels], "out": out,
                                       "cluster": {**cluster, "dashboard": None}, **extra})
    start = time.perf_counter()
    result = run_archive(config, say=lambda line: None)
    seconds = time.perf_counter() - start
    if result.exit_code != 0:
        raise SystemExit(f"run into {out} failed: {result.summary}")
    return seconds, json.loads((out / "report.json").read_text())


def _flow(report: dict) -> float:
    """Seconds the run's stages took: from the cluster being up to the last slide."""
    return float(report["run"]["flow_seconds"])


def _patches(report: dict) -> int:
    return int(report["stages"].get("extract", {}).get("patches") or 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=DEMO_SLIDES)
    parser.add_argument("--size", type=int, default=DEMO_SIZE)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    labels = generate_demo_cohort(DATA_DIR / f"demo-{args.slides}x{args.size}", args.slides,
                                  (args.size, args.size))
    n = args.slides
    print(f"cohort: {n} demo slides of {args.size}² px in {labels.parent}\n")
    configs = {"1 worker x 1 thread": {"workers": 1, "torch_threads": 1},
               "2 workers x 1 thread": {"workers": 2, "torch_threads": 1},
               "1 worker, all cores": {"workers": 1}}
    root = Path(tempfile.mkdtemp(prefix="bench-run-"))
    try:
        timings = {}
        for name, cluster in configs.items():
            out = root / name.split(" (")[0].replace(" ", "_")
            timings[name] = _run(labels, out, cluster, stages=CPU_STAGES)
            print(f"{name}: {timings[name][0]:.1f} s", flush=True)
        one_wall, one_report = timings["1 worker x 1 thread"]
        one_flow = _flow(one_report)
        rows = [[name, f"{seconds:.1f}", f"{_flow(report):.1f}",
                 f"{n / seconds * 3600:.0f}", f"{_patches(report) / _flow(report):.1f}",
                 f"{one_wall / seconds:.2f}x", f"{one_flow / _flow(report):.2f}x"]
                for name, (seconds, report) in timings.items()]
        print("\ntile + extract (the CPU-bound stages)")
        print_table(["configuration", "wall s", "stages s", "slides/h (wall)",
                     "patches/s (stages)", "vs 1 worker (wall)", "vs 1 worker (stages)"], rows)

        features_run = root / "2_workers_x_1_thread"
        model = root / "model"
        train_run(MILRunConfig.model_validate({
            "labels": labels, "features": features_run / "slides",
            "cv": {"folds": 3, "seed": 0},
            "train": {"epochs": 5, "patience": 5, "max_instances": None},
            "evaluation": {"n_bootstrap": 0}}), model)
        rest, _ = _run(labels, features_run, {"workers": 2, "torch_threads": 1},
                       model=[model])
        cpu, two_report = timings["2 workers x 1 thread"]
        print(f"\nwhole pipeline (2 workers): tile + extract {cpu:.1f} s, predict + export "
              f"{rest:.1f} s → {n / (cpu + rest) * 3600:.0f} slides/h "
              f"({n} slides in {cpu + rest:.1f} s)\n")
        speedup = one_flow / _flow(two_report)
        verdict("2 Dask workers over 1 on the CPU-bound stages", speedup >= TARGET_SPEEDUP,
                f"{speedup:.2f}x on the stages' time, {one_wall / cpu:.2f}x on the wall "
                f"time (target >= {TARGET_SPEEDUP}x)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
