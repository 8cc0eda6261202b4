"""Receive throughput: `idaics serve` against dcmtk's `storescp` on the same 300-slice study.

Both listen on loopback and are fed by the same number of parallel dcmtk `storescu` senders
(default 6), so that the receiver, not one sender, is the limit. `idaics serve` runs without
workers here (nothing else competes for the CPU) and with its real durability: every
instance fsync'd and its row committed before Success; `storescp` writes without fsync.

Run: ``python -m tests.bench.bench_receive [--senders N] [--repeat N]``.
Target: idaics / storescp at least 0.8 in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from node.phantom.generate import SERIES_DIR, generate_study
from tests.servers import NodeProcess, dcmtk, free_port, node_config


def send_parallel(files: list[Path], port: int, aec: str, senders: int) -> float:
    chunks = [files[i::senders] for i in range(senders)]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                dcmtk("storescu"),
                "-aet",
                "MODALITY",
                "-aec",
                aec,
                "-R",
                "127.0.0.1",
                str(port),
                *map(str, chunk),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    errors = [p.communicate()[1] for p in procs]
    seconds = time.perf_counter() - t0
    bad = [e.decode()[-300:] for p, e in zip(procs, errors) if p.returncode != 0]
    if bad:
        raise RuntimeError(f"a sender failed: {bad[0]}")
    return seconds


def wait_port(port: int, timeout: float = 30) -> None:
    import socket

    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--senders", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--slices", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        study = generate_study(tmp / "study", 4242, 0, slices=args.slices)
        files = sorted((study.folder / SERIES_DIR).glob("*.dcm"))
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{len(files)} instances, {mb:.1f} MB, {args.senders} parallel storescu senders")
        rates: dict[str, list[float]] = {"storescp": [], "idaics": []}
        for r in range(args.repeat):
            out = tmp / f"storescp{r}"
            out.mkdir()
            port = free_port()
            scp = subprocess.Popen(
                [dcmtk("storescp"), "--fork", "-od", str(out), str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_port(port)
                s = send_parallel(files, port, "STORESCP", args.senders)
                rates["storescp"].append(mb / s)
            finally:
                scp.terminate()
                scp.wait()
            shutil.rmtree(out)
            home = tmp / f"node{r}"
            cfg, values = node_config(
                home,
                workers={"count": 0},
                series={"quiet_seconds": 3600.0},
                receiver={"allowed_calling_aets": ["MODALITY"], "max_associations": 32},
            )
            node = NodeProcess(cfg, home, values["receiver"]["port"], "IDAICS").start()
            try:
                s = send_parallel(files, node.port, "IDAICS", args.senders)
                rates["idaics"].append(mb / s)
            finally:
                node.stop()
            shutil.rmtree(home)
            print(
                f"run {r + 1}: storescp {rates['storescp'][-1]:.1f} MB/s, idaics serve {rates['idaics'][-1]:.1f} MB/s"
            )
        best = {k: max(v) for k, v in rates.items()}
        ratios = [i / s for i, s in zip(rates["idaics"], rates["storescp"])]
        print(
            f"best: storescp {best['storescp']:.1f} MB/s, idaics serve {best['idaics']:.1f} MB/s; "
            f"ratio per run min {min(ratios):.2f} max {max(ratios):.2f} (target at least 0.8)"
        )


if __name__ == "__main__":
    main()
