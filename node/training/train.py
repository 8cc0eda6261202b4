"""Train a YOLOv8-seg disc model (`idaics train`) and write its model folder and card."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from node.classes import CLASS_NAMES
from node.inference.model import offline_ultralytics
from node.training.data import read_data_yaml

log = logging.getLogger(__name__)

WEIGHTS = "weights.pt"
CARD = "model.yaml"
MODEL_YAML = "yolov8n-seg.yaml"  # built from the architecture file; nothing is downloaded


@dataclass(frozen=True)
class TrainOptions:
    """Defaults follow the IDAICS paper: 512x512, 150 epochs, batch 16, lr 0.001, flips."""

    epochs: int = 150
    imgsz: int = 512
    batch: int = 16
    lr0: float = 0.001
    fliplr: float = 0.5
    seed: int = 0
    device: str | None = None
    workers: int = 2
    patience: int = 100
    architecture: str = MODEL_YAML
    fraction: float = 1.0
    degrees: float = 0.0


def choose_device(requested: str | None = None) -> str:
    """The GPU when there is one, else the CPU (or what was asked for)."""
    if requested:
        return requested
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def plot_curves(results_csv: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results_csv, newline="") as f:
        rows = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]
    if not rows:
        return
    epochs = [int(float(r["epoch"])) for r in rows]
    keys = [k for k in rows[0] if k.startswith(("train/", "val/")) or k.startswith("metrics/")]
    n = len(keys)
    cols = 4
    fig, axes = plt.subplots(
        (n + cols - 1) // cols, cols, figsize=(4 * cols, 2.6 * ((n + cols - 1) // cols)), dpi=90
    )
    for ax, k in zip(axes.ravel(), keys):
        ax.plot(epochs, [float(r[k]) for r in rows], marker=".")
        ax.set_title(k, fontsize=9)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def train(
    data_yaml: Path,
    out: Path,
    *,
    from_weights: Path | None = None,
    options: TrainOptions | None = None,
    description: str = "",
    command: str = "",
) -> Path:
    """Train and write ``out/`` (weights, card, curves); returns the card's path."""
    opts = options or TrainOptions()
    data = read_data_yaml(data_yaml)
    if not data.images("train"):
        raise ValueError(f"{data.path}: no training images in {data.train}")
    if from_weights is not None and not Path(from_weights).is_file():
        raise FileNotFoundError(f"{from_weights}: weights to fine-tune from not found")
    offline_ultralytics()
    from ultralytics import YOLO  # type: ignore[attr-defined]  # its public name, re-exported lazily

    device = choose_device(opts.device)
    start = time.time()
    model = YOLO(str(from_weights)) if from_weights else YOLO(opts.architecture)
    with tempfile.TemporaryDirectory(prefix="idaics-train-") as tmp:
        no_val = not data.images("val")
        data_path = data.path
        if no_val:  # ultralytics needs a val folder with images; nothing is measured on it
            log.warning("%s: no validation images; trained without validation", data.path)
            doc = yaml.safe_load(data.path.read_text())
            doc["path"], doc["val"] = str(data.root.resolve()), doc["train"]
            data_path = Path(tmp) / "data.yaml"
            data_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        model.train(
            data=str(data_path),
            epochs=opts.epochs,
            imgsz=opts.imgsz,
            batch=opts.batch,
            lr0=opts.lr0,
            optimizer="AdamW",
            fliplr=opts.fliplr,
            flipud=0.0,
            mosaic=0.0,
            hsv_h=0.0,
            hsv_s=0.0,
            degrees=opts.degrees,
            seed=opts.seed,
            deterministic=True,
            device=device,
            workers=opts.workers,
            patience=opts.patience,
            project=tmp,
            name="run",
            exist_ok=True,
            plots=False,
            verbose=False,
            amp=device != "cpu",
            val=not no_val,
            fraction=opts.fraction,
            # from given weights: start from them (transfer learning, fine-tuning); else from scratch
            pretrained=str(from_weights) if from_weights else False,
        )
        run = Path(tmp) / "run"
        best = run / "weights" / "best.pt"
        if not best.is_file():
            best = run / "weights" / "last.pt"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best, out / WEIGHTS)
        if (run / "results.csv").is_file():
            shutil.copyfile(run / "results.csv", out / "results.csv")
            plot_curves(run / "results.csv", out / "training_curves.png")
    elapsed = time.time() - start
    digest = hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest()[:8]
    card = {
        "name": out.name,
        # a version per set of weights: the SR, SEG and job records name it
        "version": f"{dt.date.today().isoformat()}.{digest}",
        "format": "ultralytics YOLOv8-seg",
        "architecture": opts.architecture
        if not from_weights
        else f"fine-tuned from {from_weights}",
        "weights": WEIGHTS,
        "classes": list(CLASS_NAMES),
        "input_size": opts.imgsz,
        "windowing": data.idaics.get("windowing", {"center": 60.0, "width": 600.0}),
        "views": data.idaics.get("views", "native"),
        "training": {
            "data": description
            or f"dataset {data.root.name} ({data.idaics.get('source', 'unknown source')})",
            "images": data.idaics.get("images", {}),
            "instances": data.idaics.get("instances", {}),
            "studies": {k: len(v) for k, v in data.idaics.get("studies", {}).items()},
            "epochs": opts.epochs,
            "batch": opts.batch,
            "lr0": opts.lr0,
            "optimizer": "AdamW",
            "fliplr": opts.fliplr,
            "seed": opts.seed,
            "device": device,
            "seconds": round(elapsed, 1),
            "command": command or " ".join(sys.argv),
        },
        "date": dt.date.today().isoformat(),
        "intended_use": "Research and integration testing of the IDAICS node.",
        "limits": "Not for clinical use.",
        "metrics": {},
    }
    path = out / CARD
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    log.info("model written to %s in %.0f s", out, elapsed)
    return path


def update_card(model_dir: Path, **fields: Any) -> None:
    path = model_dir / CARD
    card = yaml.safe_load(path.read_text())
    card.update(fields)
    path.write_text(yaml.safe_dump(card, sort_keys=False))
