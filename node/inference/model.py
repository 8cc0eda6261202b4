"""A model bundle (weights + card), loaded once per process, and batched prediction.

The card says what the model expects: classes, input size, windowing and views (disc-centred
slices of the sizes it gives, or ``native``: whole slices at the series' own pixel size, as the
paper annotated them). Inference
runs on the GPU with half precision where there is one, on the CPU otherwise.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import yaml

from node.calibration import Calibration
from node.classes import CLASS_NAMES
from node.inference.interface import Detection, ViewSpec, Windowing

log = logging.getLogger(__name__)

CARD = "model.yaml"
NATIVE = "native"


class ModelError(ValueError):
    """A model folder that cannot be used, with the reason."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    folder: Path
    weights: Path
    classes: tuple[str, ...]
    input_size: int
    windowing: Windowing
    #: The disc-centred views the analysis reads the model's detections on (the model's input,
    #: unless ``native``).
    views: ViewSpec
    raw: dict
    #: The model was trained on whole slices at the series' own pixel size (`views: native`).
    native: bool = False

    @property
    def calibration(self) -> Calibration | None:
        """The card's confidence calibration, or None."""
        return Calibration.from_card(self.raw.get("calibration"))

    @property
    def version(self) -> str:
        return str(self.raw.get("version") or self.raw.get("date") or "0")


def read_card(folder: Path) -> ModelCard:
    folder = Path(folder)
    path = folder / CARD
    if not path.is_file():
        raise ModelError(f"{folder}: no {CARD} model card")
    raw = yaml.safe_load(path.read_text()) or {}
    classes = tuple(raw.get("classes") or ())
    if classes != CLASS_NAMES:
        raise ModelError(f"{path}: classes {list(classes)} are not {list(CLASS_NAMES)}")
    weights = folder / str(raw.get("weights", "weights.pt"))
    if not weights.is_file():
        raise ModelError(f"{path}: weights {weights.name} not found")
    views = raw.get("views")
    native = views == NATIVE
    if native:
        views = {}
    elif not isinstance(views, dict):
        raise ModelError(
            f"{path}: views {views!r} are neither '{NATIVE}' (whole slices) nor disc-centred "
            "(size, axial_fov_mm, sagittal_fov_mm)"
        )
    w = raw.get("windowing") or {}
    return ModelCard(
        name=str(raw.get("name", folder.name)),
        folder=folder,
        weights=weights,
        classes=classes,
        input_size=int(raw.get("input_size", 512)),
        windowing=Windowing(float(w.get("center", 60.0)), float(w.get("width", 600.0))),
        views=ViewSpec(
            int(views.get("size", 512)),
            float(views.get("axial_fov_mm", 80.0)),
            float(views.get("sagittal_fov_mm", 100.0)),
        ),
        raw=raw,
        native=native,
    )


def pick_device(requested: str | None = None) -> str:
    if requested and requested != "auto":
        return requested
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def offline_ultralytics() -> None:
    """Keep ultralytics from reaching for the network (settings sync, fonts, hub)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.utils import SETTINGS

    try:
        SETTINGS.update({"sync": False, "hub": False} if "hub" in SETTINGS else {"sync": False})  # type: ignore[no-untyped-call]
    except OSError as exc:  # settings file not writable: YOLO_OFFLINE keeps it off the network
        log.debug("ultralytics settings not written: %s", exc)


class DiscModel:
    """The YOLOv8-seg model of a bundle, ready for batched prediction."""

    def __init__(self, card: ModelCard, device: str | None = None) -> None:
        offline_ultralytics()
        from ultralytics import YOLO  # type: ignore[attr-defined]  # its public name, re-exported lazily

        self.card = card
        self.device = pick_device(device)
        self.half = self.device.startswith("cuda")
        self._yolo = YOLO(str(card.weights))
        self._lock = threading.Lock()
        # warm-up: the first call pays for fusing layers and allocating buffers
        self.predict([np.zeros((card.views.size, card.views.size), dtype=np.uint8)])

    def predict(self, images: list[np.ndarray], conf: float = 0.1) -> list[list[Detection]]:
        """Detections for each greyscale uint8 image, in one batched call."""
        if not images:
            return []
        rgb = [np.repeat(im[..., None], 3, axis=2) for im in images]
        with self._lock:
            results = self._yolo.predict(
                rgb,
                imgsz=self.card.input_size,
                conf=conf,
                device=self.device,
                verbose=False,
                retina_masks=True,
                batch=len(rgb),
                **({"half": True} if self.half else {}),
            )
        out = []
        for res in cast(list[Any], results):  # ultralytics Results
            dets = []
            if res.boxes is not None and len(res.boxes):
                cls = res.boxes.cls.cpu().numpy().astype(int)
                confs = res.boxes.conf.cpu().numpy()
                xyxy = res.boxes.xyxy.cpu().numpy()
                masks = res.masks.data.cpu().numpy() > 0.5 if res.masks is not None else None
                for i in range(len(cls)):
                    m = masks[i] if masks is not None else np.zeros(res.orig_shape, bool)
                    x0, y0, x1, y1 = (float(v) for v in xyxy[i])
                    dets.append(Detection(int(cls[i]), float(confs[i]), (x0, y0, x1, y1), m))
            out.append(dets)
        return out


_CACHE: dict[tuple[str, str], DiscModel] = {}
_CACHE_LOCK = threading.Lock()


def load_model(folder: Path, device: str | None = None) -> DiscModel:
    """The model of ``folder``, loaded once per process and device."""
    key = (str(Path(folder).resolve()), pick_device(device))
    with _CACHE_LOCK:
        if key not in _CACHE:
            card = read_card(Path(folder))
            log.info("loading model %s on %s", card.name, key[1])
            _CACHE[key] = DiscModel(card, device)
        return _CACHE[key]
