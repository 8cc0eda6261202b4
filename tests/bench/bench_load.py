"""Load: N parallel dcmtk senders, each with its own 150-instance series, against `idaics serve`
(no workers). Prints instances per second and the node's peak memory.

Run: ``python -m tests.bench.bench_load [--senders 20] [--instances 150] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.load import run_load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--senders", type=int, default=20)
    ap.add_argument("--instances", type=int, default=150)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    rates, peaks = [], []
    for i in range(a.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            r = run_load(Path(tmp), a.senders, a.instances)
        ok = r.stored == r.sent and set(r.jobs_per_series.values()) == {1} and not r.failed_senders
        rates.append(r.per_second)
        peaks.append(r.peak_rss_mb)
        print(
            f"run {i + 1}: {r.sent} instances from {r.senders} senders in {r.seconds:.1f} s = "
            f"{r.per_second:.0f} instances/s; node peak RSS {r.peak_rss_mb:.0f} MB; "
            f"stored {r.stored}, {r.series} series in {len(r.instances_per_job)} jobs: {'ok' if ok else 'LOST OR SPLIT'}"
        )
    print(
        f"instances/s min {min(rates):.0f} max {max(rates):.0f}; peak RSS min {min(peaks):.0f} max {max(peaks):.0f} MB"
    )


if __name__ == "__main__":
    main()
