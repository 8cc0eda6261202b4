"""Pictures of phantom studies with their truth drawn on, to judge realism by eye."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from node.analysis.report import TILE, outlined_tile
from node.analysis.views import disc_plane
from node.analysis.volume import Volume, load_folder
from node.classes import DiscClass
from node.geometry import Plane, sample_plane
from node.inference.interface import View, ViewSpec, Windowing
from node.phantom.generate import SERIES_DIR, TRUTH_FILE, Labels, load_labels


def _tile(
    vol: Volume, labels: Labels, plane: Plane, window: Windowing, caption: str
) -> Image.Image:
    grey = window.apply(sample_plane(vol.hu, vol.grid, plane, order=1, fill=-1000.0))
    cls = sample_plane(labels.disc_class, labels.grid, plane, order=0)
    return outlined_tile(grey, [(cls == c.class_id + 1, c) for c in DiscClass], caption, TILE)


def _save_sheet(tiles: list[Image.Image], cols: int, path: Path) -> Path:
    """The tiles in rows of ``cols``, saved as one picture (at least one row high)."""
    rows = max(1, (len(tiles) + cols - 1) // cols)
    sheet = Image.new("RGB", (cols * TILE, rows * TILE))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * TILE, (i // cols) * TILE))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def render_study(folder: Path, out: Path, window: Windowing | None = None) -> Path:
    """Write ``out/<study>.png``: an overview row, then axial and sagittal tiles per disc."""
    window = window or Windowing()
    truth = json.loads((folder / TRUTH_FILE).read_text())
    vol = load_folder(folder / SERIES_DIR)
    labels = load_labels(folder)
    spec = ViewSpec(size=384)
    tiles: list[Image.Image] = []
    # overview: mid-sagittal through the spine and the scanner's own axial slice at mid-range
    lv = truth["levels"]
    if lv:
        c = np.mean([x["centre_lps"] for x in lv], axis=0)
        over = Plane(c, np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0]), 384, 300 / 384)
        tiles.append(_tile(vol, labels, over, Windowing(300, 1500), "mid-sagittal, bone window"))
        k = int(round(vol.grid.to_index(np.array(lv[len(lv) // 2]["centre_lps"])[None])[0][0]))
        fov = vol.grid.spacing[2] * vol.grid.shape[2]
        ax = Plane(
            vol.grid.to_patient(np.array([k, 255.5, 255.5])),
            np.array([1.0, 0, 0]),
            np.array([0, 1.0, 0]),
            384,
            fov / 384,
        )
        tiles.append(_tile(vol, labels, ax, Windowing(40, 400), f"scanner axial {k + 1}"))
    for entry in lv:
        centre = np.array(entry["centre_lps"])
        up = np.array(entry["normal_lps"])
        left = np.array(entry["left_lps"])
        frame = np.stack([left, np.cross(up, left), up], axis=1)
        name = f"{entry['level']} {'+'.join(entry['classes'])}"
        for view in (View.AXIAL, View.SAGITTAL):
            plane = disc_plane(view, centre, frame, spec)
            extra = (
                f" {entry['extension_mm']:.1f}mm {entry['extension_share'] * 100:.0f}%"
                if view is View.AXIAL
                else ""
            )
            tiles.append(_tile(vol, labels, plane, window, f"{name} {view.value}{extra}"))
    return _save_sheet(tiles, 4, out / f"{folder.name}.png")


def render_inserted(
    folder: Path, original: Volume, out: Path, window: Windowing | None = None
) -> Path:
    """Write ``out/<study>-inserted.png``: per inserted level, the untouched real slice, the same
    slice with the lesion, and the lesion's truth outline; axial then sagittal."""
    window = window or Windowing(40, 400)
    truth = json.loads((folder / TRUTH_FILE).read_text())
    vol = load_folder(folder / SERIES_DIR)
    labels = load_labels(folder)
    spec = ViewSpec(size=384)
    tiles: list[Image.Image] = []
    for entry in truth["levels"]:
        if not entry.get("inserted"):
            continue
        centre = np.array(entry["centre_lps"])
        up, left = np.array(entry["normal_lps"]), np.array(entry["left_lps"])
        frame = np.stack([left, np.cross(up, left), up], axis=1)
        node = entry.get("schmorl")
        name = f"{entry['level']} {'+'.join(entry['classes'])}"
        for view in (View.AXIAL, View.SAGITTAL):
            off = 0.0
            if node and entry["morphology"] == "unknown":  # through the node
                d = np.array(node["centre_lps"]) - centre
                off = float(d @ (up if view is View.AXIAL else left))
            plane = disc_plane(view, centre, frame, spec, offset_mm=off)
            before = window.apply(
                sample_plane(original.hu, original.grid, plane, order=1, fill=-1000.0)
            )
            tiles.append(
                outlined_tile(before, [], f"{entry['level']} {view.value} as scanned", TILE)
            )
            after = window.apply(sample_plane(vol.hu, vol.grid, plane, order=1, fill=-1000.0))
            tiles.append(outlined_tile(after, [], f"{name} inserted", TILE))
            tiles.append(_tile(vol, labels, plane, window, f"{name} truth"))
    return _save_sheet(tiles, 6, out / f"{folder.name}-inserted.png")
