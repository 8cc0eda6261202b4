"""Time to generate one 300-slice phantom study on one core, per stage (prints figures).

Run: ``python -m tests.bench.bench_synth [--repeat N]``. Target: under 10 s.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from node.phantom.anatomy import acquire, paint  # noqa: E402
from node.phantom.generate import _disc_truth, save_labels, study_grid  # noqa: E402
from node.phantom.plan import plan_study  # noqa: E402
from node.phantom.series import write_series  # noqa: E402


def run_once(seed: int, out: Path) -> dict[str, float]:
    t = {}
    t0 = time.perf_counter()
    plan = plan_study(seed, 0, slices=300)
    grid = study_grid(plan)
    t["plan"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    painted = paint(plan, grid)
    t["paint"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    [_disc_truth(plan, grid, painted, i) for i, d in enumerate(plan.discs) if d.reported]
    t["truth"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    acquire(painted.hu, grid, plan)
    t["noise+blur"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_series(painted.hu, grid, plan, out / f"s{seed}")
    save_labels(out / f"s{seed}.npz", painted, grid)
    t["write"] = time.perf_counter() - t0
    t["total"] = sum(t.values())
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            rows.append(run_once(100 + i, Path(tmp)))
    keys = list(rows[0])
    print("phantom generation, 300 slices of 512x512, one core (seconds)")
    print(" ".join(f"{k:>11}" for k in keys))
    for r in rows:
        print(" ".join(f"{r[k]:>11.2f}" for k in keys))
    best = min(r["total"] for r in rows)
    print(f"best total {best:.2f} s (target < 10 s): {'met' if best < 10 else 'NOT met'}")


if __name__ == "__main__":
    main()
