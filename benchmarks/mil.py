"""MIL training throughput and memory: ABMIL and TransMIL at 1k, 10k and 100k instances per bag.

Run ``.venv/bin/python benchmarks/mil.py`` (``--quick`` for a smoke run without the 100k bags).

Each configuration runs in a fresh process (so its peak memory is its own) on the device
``mil.train`` picks (CUDA when available, else the CPU with all its cores). Bags hold
``IN_DIM`` = 1024-d float32 features (ResNet-50-trunc / UNI size), every instance kept
(``max_instances: null``; the default training config subsamples bags above 8192 instances,
which caps the cost of the 10k and 100k rows at the 8192 figure), batch size 1, binary labels.

slidepipe's rate comes from ``mil.train.train_model`` itself (the DataLoader, padding and mask,
``compute_loss``, AdamW, the cosine schedule, the per-epoch validation on one 256-instance bag):
epoch 1 is a warm-up, and the bags of epochs 2-3 divided by their time is the figure. Baselines,
in the same process:

* ABMIL: the reference formulation (CLAM's ``CLAM_SB`` / Ilse et al.): one unpadded bag, no mask,
  ``fc -> attention_net -> softmax(A.T) -> A @ h -> classifier``, plain cross-entropy and AdamW
  in a bare loop. The ratio shows what slidepipe's masked, batched interface costs.
* TransMIL: the same model with exact softmax attention (``n_landmarks`` >= the bag), the
  formulation without Nyström's approximation. Its attention matrices grow as n²; it runs only
  where they fit in 70 % of the available memory (an estimate of 3 n × n float32 matrices per
  head per layer, kept for the backward pass); otherwise the row shows the memory it would need.
  Likewise a slidepipe row is skipped when its memory, extrapolated from the two rows before,
  would not fit in 85 % (a line through the last two rows overestimates: TransMIL at 100k
  instances was projected at +15.2 GiB from the 1k and 10k rows and used +10.0 GiB).

Peak memory: on the CPU the process's ``VmHWM`` and the part of it above the resident size
before the model was built (the features are shared by all bags of a run and loaded first);
on CUDA ``torch.cuda.max_memory_allocated``. No targets: the issue asks for the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
import torch
from _common import REPO_ROOT, machine, peak_rss, print_table
from torch import nn

from mil.data import BagDataset, Case
from mil.train import TrainConfig, resolve_device, train_model

IN_DIM = 1024
SIZES = (1_000, 10_000, 100_000)
#: Bags per epoch for each bag size (about the same instances per epoch, at least two bags).
BAGS = {1_000: 32, 10_000: 6, 100_000: 2}
EPOCHS = 3
VAL_INSTANCES = 256
#: Exact attention keeps about this many n x n float32 matrices per head and layer.
EXACT_MATRICES = 3
RESULT_MARK = "MIL-BENCH-RESULT "
#: The exact-attention baseline runs only when its estimated memory fits in this share of
#: the available memory.
MEMORY_SHARE = 0.7
#: A slidepipe row runs only when its memory, extrapolated from the smaller sizes (an
#: overestimate), fits in this share of the available memory.
PROJECTED_SHARE = 0.85


def current_rss() -> int:
    return psutil.Process().memory_info().rss


def bag_features(instances: int) -> np.ndarray:
    """One random (instances, IN_DIM) float32 bag, shared by all bags of a run."""
    return np.random.default_rng(0).standard_normal((instances, IN_DIM), dtype=np.float32)


class ReferenceABMIL(nn.Module):
    """ABMIL as CLAM's ``CLAM_SB`` / Ilse et al. write it: one unpadded bag, no mask."""

    def __init__(self, in_dim: int, n_classes: int, embed_dim: int = 256,
                 attention_dim: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_net = nn.Sequential(nn.Linear(embed_dim, attention_dim), nn.Tanh(),
                                           nn.Dropout(dropout), nn.Linear(attention_dim, 1))
        self.classifier = nn.Linear(embed_dim, n_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.fc(h)                                          # (N, H)
        attention = torch.softmax(self.attention_net(h).T, dim=1)   # (1, N)
        return self.classifier(attention @ h)                   # (1, C)


def slidepipe_rate(model: str, options: dict[str, Any], instances: int, bags: int,
                   device: torch.device) -> float:
    """Bags/s of ``train_model`` over epochs 2..EPOCHS."""
    features = bag_features(instances)
    validation = bag_features(VAL_INSTANCES)
    cases = [Case(f"bag{i}", i % 2, (f"bag{i}",), f"bag{i}") for i in range(bags)]
    train_set = BagDataset(cases, lambda _: features)
    val_set = BagDataset([Case("val", 0, ("val",), "val"), Case("val1", 1, ("val1",), "val1")],
                         lambda _: validation)
    ends: list[float] = []

    def on_epoch(_: object) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())

    config = TrainConfig(model=model, model_options=options, epochs=EPOCHS, patience=EPOCHS,
                         max_instances=None, device=str(device))
    train_model(train_set, val_set, in_dim=IN_DIM, n_classes=2, config=config,
                on_epoch=on_epoch)
    return bags * (EPOCHS - 1) / (ends[-1] - ends[0])


def reference_abmil_rate(instances: int, bags: int, device: torch.device) -> float:
    """Bags/s of :class:`ReferenceABMIL` in a bare loop, epochs 2..EPOCHS."""
    torch.manual_seed(0)
    features = torch.from_numpy(bag_features(instances))
    model = ReferenceABMIL(IN_DIM, 2).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    start = 0.0
    for epoch in range(EPOCHS):
        if epoch == 1:
            start = time.perf_counter()
        for index in range(bags):
            label = torch.tensor([index % 2], device=device)
            loss = nn.functional.cross_entropy(model(features.to(device)), label)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            float(loss.detach())
    return bags * (EPOCHS - 1) / (time.perf_counter() - start)


def exact_attention_bytes(instances: int, heads: int = 8, layers: int = 2) -> int:
    """Memory exact attention needs for its n x n matrices (see the module docstring)."""
    tokens = instances + 1
    return EXACT_MATRICES * layers * heads * tokens * tokens * 4


def child_main(spec: dict[str, Any]) -> int:
    """In a fresh process: one configuration; print its figures as one JSON line."""
    device = resolve_device("auto")
    instances, bags, variant = spec["instances"], spec["bags"], spec["variant"]
    rss_before = current_rss() + instances * IN_DIM * 4   # the shared bag, loaded first
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rate: Callable[[], float] = {
        "abmil": lambda: slidepipe_rate("abmil", {}, instances, bags, device),
        "abmil-reference": lambda: reference_abmil_rate(instances, bags, device),
        "transmil": lambda: slidepipe_rate("transmil", {}, instances, bags, device),
        "transmil-exact": lambda: slidepipe_rate(
            "transmil", {"n_landmarks": instances + 1}, instances, bags, device),
    }[variant]
    bags_per_second = rate()
    report = {"rate": bags_per_second, "peak": peak_rss(), "before": rss_before,
              "cuda_peak": (torch.cuda.max_memory_allocated() if device.type == "cuda"
                            else None)}
    print(RESULT_MARK + json.dumps(report), flush=True)
    return 0


def run_child(variant: str, instances: int, bags: int) -> dict[str, Any]:
    spec = {"variant": variant, "instances": instances, "bags": bags}
    process = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                             capture_output=True, text=True, cwd=REPO_ROOT)
    for line in process.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise SystemExit(f"{variant} at {instances} instances failed:\n{process.stderr[-3000:]}")


def projected_growth(measured: list[tuple[int, int]], size: int) -> float:
    """Memory growth at ``size`` instances, extrapolated from the rows measured so far (a line
    through the last two, or through the origin and the only one)."""
    if not measured:
        return 0.0
    points = [(0, 0), *measured][-2:]
    (size_a, growth_a), (size_b, growth_b) = points
    return growth_b + (growth_b - growth_a) / (size_b - size_a) * (size - size_b)


def gib(size: float) -> str:
    return f"{size / 2**30:.2f} GiB"


def memory_cell(result: dict[str, Any]) -> str:
    """Peak memory of one run: CUDA's allocator peak, or VmHWM (+ growth over the start)."""
    if result["cuda_peak"] is not None:
        return f"GPU {gib(result['cuda_peak'])}"
    return f"{gib(result['peak'])} (+{gib(max(0, result['peak'] - result['before']))})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1k and 10k instances only, fewer bags (about a minute)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))

    device = resolve_device("auto")
    sizes = SIZES[:2] if args.quick else SIZES
    bags = {size: max(2, count // (4 if args.quick else 1)) for size, count in BAGS.items()}
    print(f"slidepipe MIL training benchmark — {machine()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {device}"
          + (f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else ""))
    print(f"{IN_DIM}-d features, batch 1, all instances, {EPOCHS} epochs (first is warm-up); "
          "a fresh process per row\n")
    free = psutil.virtual_memory().available
    rows = []
    for model, baseline in (("abmil", "abmil-reference"), ("transmil", "transmil-exact")):
        measured: list[tuple[int, int]] = []
        for size in sizes:
            projected = projected_growth(measured, size) + size * IN_DIM * 4
            if projected > PROJECTED_SHARE * psutil.virtual_memory().available:
                rows.append([model, size, bags[size], f"skipped: needs ~{gib(projected)}",
                             "–", "–", baseline, "–", "–", "–"])
                continue
            print(f"{model}: {size} instances x {bags[size]} bags…", flush=True)
            ours = run_child(model, size, bags[size])
            measured.append((size, max(0, ours["peak"] - ours["before"])))
            needed = exact_attention_bytes(size) if baseline == "transmil-exact" else 0
            if needed > free * MEMORY_SHARE:
                base_cells = [f"skipped: needs ~{gib(needed)}", "–", "–"]
            else:
                print(f"{baseline}: {size} instances x {bags[size]} bags…", flush=True)
                base = run_child(baseline, size, bags[size])
                base_cells = [f"{base['rate']:.2f}", memory_cell(base),
                              f"{ours['rate'] / base['rate']:.2f}"]
            rows.append([model, size, bags[size], f"{ours['rate']:.2f}",
                         f"{size * ours['rate']:,.0f}", memory_cell(ours), baseline,
                         *base_cells])
    print()
    print_table(["model", "instances/bag", "bags", "bags/s", "instances/s",
                 "peak memory (+ over start)", "baseline", "baseline bags/s",
                 "baseline memory", "speed ratio"], rows)
    print("\nabmil-reference: CLAM/Ilse-style single-bag ABMIL in a bare training loop; "
          "transmil-exact: TransMIL with exact softmax attention instead of Nyström")
    return 0


if __name__ == "__main__":
    sys.exit(main())
