"""Per-image evaluation of a model on a dataset split (`idaics evaluate --data`).

Each image counts once, as in the IDAICS paper. Its true class is the ``target`` of the
manifest (the disc or node the image was made for) or, without a manifest, the most
specific class among its labels. The predicted class is that of the most confident
detection covering the image centre when the image has a target, else the most specific
class detected. An image with no detection is counted under ``none``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from node.classes import CLASS_NAMES, DiscClass, most_severe
from node.training.data import read_data_yaml
from node.training.metrics import Metrics, compute, plot_confusion

NONE = "none"
CONF = 0.25


@dataclass(frozen=True)
class ImageResult:
    image: str
    truth: str
    predicted: str
    confidence: float


def _label_classes(label_file: Path) -> set[DiscClass]:
    if not label_file.is_file():
        return set()
    return {DiscClass(CLASS_NAMES[int(line.split()[0])]) for line in label_file.read_text().splitlines() if line.strip()}


def predict_image_class(result, centred: bool, conf: float = CONF) -> tuple[str, float]:
    """Class of one ultralytics result, by the rule in the module docstring."""
    boxes = result.boxes
    if boxes is None or len(boxes) == 0:
        return NONE, 0.0
    cls = boxes.cls.cpu().numpy().astype(int)
    confs = boxes.conf.cpu().numpy()
    keep = confs >= conf
    if not keep.any():
        return NONE, 0.0
    if centred:
        h, w = result.orig_shape
        cy, cx = h / 2, w / 2
        xyxy = boxes.xyxy.cpu().numpy()
        inside = keep & (xyxy[:, 0] <= cx) & (xyxy[:, 2] >= cx) & (xyxy[:, 1] <= cy) & (xyxy[:, 3] >= cy)
        if result.masks is not None and inside.any():
            m = result.masks.data.cpu().numpy()
            mh, mw = m.shape[1:]
            on = m[:, int(mh / 2), int(mw / 2)] > 0.5
            if (inside & on).any():
                inside = inside & on
        pool = np.flatnonzero(inside) if inside.any() else np.flatnonzero(keep)
        best = pool[np.argmax(confs[pool])]
        return CLASS_NAMES[cls[best]], float(confs[best])
    found = {DiscClass(CLASS_NAMES[c]) for c in cls[keep]}
    top = most_severe(found)
    return top.value, float(confs[keep][cls[keep] == top.class_id].max())


def evaluate_dataset(model_dir: Path, data_yaml: Path, *, split: str = "val", out: Path | None = None,
                     device: str | None = None, batch: int = 16) -> tuple[Metrics, list[ImageResult]]:
    from node.training.train import CARD, WEIGHTS, _offline, choose_device

    data = read_data_yaml(data_yaml)
    card = yaml.safe_load((Path(model_dir) / CARD).read_text()) if (Path(model_dir) / CARD).is_file() else {}
    weights = Path(model_dir) / card.get("weights", WEIGHTS) if Path(model_dir).is_dir() else Path(model_dir)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: model weights not found")
    _offline()
    from ultralytics import YOLO

    model = YOLO(str(weights))
    imgsz = int(card.get("input_size", 512))
    manifest = data.manifest()
    images = data.images(split)
    if not images:
        raise ValueError(f"{data.path}: no {split} images")
    results: list[ImageResult] = []
    dev = choose_device(device)
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        preds = model.predict([str(p) for p in chunk], imgsz=imgsz, conf=CONF, device=dev, verbose=False,
                              retina_masks=False)
        for path, res in zip(chunk, preds):
            rel = str(path.relative_to(data.root))
            row = manifest.get(rel, {})
            label_file = data.root / "labels" / split / (path.stem + ".txt")
            truth = row.get("target") or (most_severe(_label_classes(label_file)).value
                                          if _label_classes(label_file) else "")
            if not truth:
                continue  # an image without any labelled disc has no class to count
            pred, c = predict_image_class(res, centred=bool(row.get("target")))
            results.append(ImageResult(rel, truth, pred, c))
    labels = list(CLASS_NAMES) + ([NONE] if any(r.predicted == NONE for r in results) else [])
    cm = np.zeros((len(labels), len(labels)), dtype=int)
    for r in results:
        cm[labels.index(r.truth), labels.index(r.predicted)] += 1
    metrics = compute(cm, labels)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(
            {"unit": "image", "split": split, "data": str(data.path), "model": str(model_dir)}
            | metrics.to_dict() | {"images": [r.__dict__ for r in results]}, indent=1))
        plot_confusion(metrics, out / "confusion_matrix.png")
    return metrics, results
