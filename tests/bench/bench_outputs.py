"""Time to build the SEG, the TID 1500 SR and the key images of a 300-slice phantom study.

Run: ``python -m tests.bench.bench_outputs [--model models/NAME] [--repeat N]``.
Target: under 3 s on the CPU for all three (build only; writing the files is timed apart).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from node.analysis.study import analyze_volume
from node.analysis.volume import load_folder
from node.cli import DEFAULT_MODEL
from node.inference.model import load_model
from node.outputs import OutputSettings, build_outputs, write_outputs
from node.phantom.generate import SERIES_DIR, generate_study


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        study = generate_study(Path(tmp), 4242, 0, slices=300)
        model = load_model(args.model, args.device)
        vol = load_folder(study.folder / SERIES_DIR)
        result = analyze_volume(vol, model)
        print(f"{len(vol.headers)} slices, {len(result.discs)} levels")
        print(
            f"{'segments':>9} {'seg':>7} {'sr':>7} {'keys':>7} {'build':>7} {'write':>7}  objects, SEG frames, MB"
        )
        for i in range(args.repeat):
            t0 = time.perf_counter()
            out = build_outputs(result, vol, model.card, OutputSettings())
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            paths = write_outputs(out, Path(tmp) / f"out{i}")
            write_s = time.perf_counter() - t0
            t = out.timings
            mb = sum(p.stat().st_size for p in paths) / 1e6
            frames = int(out.seg.NumberOfFrames) if out.seg is not None else 0
            print(
                f"{t['segments']:>9.2f} {t.get('seg', 0):>7.2f} {t['sr']:>7.2f} {t['key_images']:>7.2f} "
                f"{build_s:>7.2f} {write_s:>7.2f}  {len(paths)}, {frames}, {mb:.1f}"
            )
    print("target: build under 3 s on the CPU")


if __name__ == "__main__":
    main()
