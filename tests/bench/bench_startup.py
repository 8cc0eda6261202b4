"""Start-up: how long `idaics --help`, `import node.config` and `idaics echo` take before they
do their work (each a fresh process; echo to a closed loopback port, so it fails at once).

Run: ``python -m tests.bench.bench_startup [--repeat 5]``. Target: under 0.5 s each.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from tests.servers import free_port


def seconds(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    py = sys.executable
    cases = {
        "idaics --help": [py, "-m", "node.cli", "--help"],
        "import node.config": [py, "-c", "import node.config"],
        "idaics echo (closed port)": [py, "-m", "node.cli", "echo", f"X@127.0.0.1:{free_port()}"],
    }
    for name, cmd in cases.items():
        runs = [seconds(cmd) for _ in range(a.repeat)]
        print(f"{name:28s} min {min(runs):.2f} s  max {max(runs):.2f} s  (target 0.5 s)")


if __name__ == "__main__":
    main()
