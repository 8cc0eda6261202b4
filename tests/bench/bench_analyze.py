"""Per-stage timings and peak memory of the study analysis on a 300-slice phantom study.

Run: ``python -m tests.bench.bench_analyze [--model models/NAME] [--device cpu|cuda:0]``.
Targets: at most 4 s on the 2-core CPU with the bundled model (reading the series included),
at most 1 s on an H100; peak memory under 2 GB.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from node.analysis.study import analyze_volume
from node.analysis.volume import load_folder
from node.cli import DEFAULT_MODEL
from node.inference.model import load_model
from node.phantom.generate import SERIES_DIR, generate_study


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        study = generate_study(Path(tmp), 4242, 0, slices=300)
        t0 = time.perf_counter()
        model = load_model(args.model, args.device)
        load_s = time.perf_counter() - t0
        print(
            f"model {model.card.name} on {model.device}: loaded and warmed up in {load_s:.2f} s (once per process)"
        )
        print(
            f"{'read':>8} {'grain':>8} {'spine':>8} {'views':>8} {'infer':>8} {'fuse':>8} "
            f"{'total':>8}  levels"
        )
        totals = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            vol = load_folder(study.folder / SERIES_DIR)
            read_s = time.perf_counter() - t0
            result = analyze_volume(vol, model)
            t = result.timings
            total = read_s + sum(t.values())
            totals.append(total)
            print(
                f"{read_s:>8.2f} {t['grain']:>8.2f} {t['spine']:>8.2f} {t['views']:>8.2f} "
                f"{t['inference']:>8.2f} {t['fusion+measure']:>8.2f} {total:>8.2f}  "
                f"{len(result.discs)}"
            )
            del vol
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(
        f"total min {min(totals):.2f} s max {max(totals):.2f} s (target at most 4 s on 2 CPU cores, "
        f"1 s on an H100); peak resident memory {peak_gb:.2f} GB (target under 2 GB)"
    )


if __name__ == "__main__":
    main()
