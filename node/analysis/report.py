"""What `idaics analyze` shows and writes: the per-level table, JSON and preview pictures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from node.analysis.study import StudyResult
from node.analysis.views import View, ViewSpec, Windowing, disc_plane
from node.analysis.volume import Volume
from node.classes import CLASS_COLOURS
from node.geometry import sample_plane

TILE = 320


def table(result: StudyResult | dict) -> str:
    """The per-level table, from a result or its JSON form (``StudyResult.to_dict()``)."""
    d = result.to_dict() if isinstance(result, StudyResult) else result
    lines = [f"{'level':<8} {'classes':<22} {'conf':>5} {'ext mm':>7} {'share':>6} {'area mm2':>9}  warnings"]
    for lv in d.get("levels", []):
        m = lv.get("measurements", {})
        ext = f"{m['extension_mm']:.1f}" if m.get("extension_mm") is not None else "-"
        share = f"{m['extension_share'] * 100:.0f}%" if m.get("extension_share") is not None else "-"
        area = f"{m['disc_area_mm2']:.0f}" if m.get("disc_area_mm2") is not None else "-"
        cls = "+".join(lv["classes"]) or "-"
        lines.append(f"{lv['level']:<8} {cls:<22} {lv['confidence']:>5.2f} {ext:>7} {share:>6} {area:>9}  "
                     f"{'; '.join(lv.get('warnings', []))}")
    if not d.get("levels"):
        lines.append("(no disc found)")
    for w in d.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def write_json(result: StudyResult, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=1))
    os.replace(tmp, path)


def outlined_tile(grey: np.ndarray, masks, caption: str, size: int = TILE) -> Image.Image:
    """A greyscale slice with each ``(mask, DiscClass)`` outlined in its class colour,
    resized to ``size`` and captioned."""
    rgb = np.repeat(grey[..., None], 3, axis=2).copy()
    for mask, cls in masks:
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(rgb, contours, -1, CLASS_COLOURS[cls], 2)
    img = Image.fromarray(rgb).resize((size, size), Image.BILINEAR)
    ImageDraw.Draw(img).text((6, 4), caption, fill=(255, 255, 0), font=ImageFont.load_default())
    return img


def mid_slice(vol: Volume, disc, view: View, window: Windowing, spec: ViewSpec) -> tuple[np.ndarray, list]:
    """The windowed mid slice of one view through a disc, and the model's ``(mask, class)``
    pairs drawn on it."""
    plane = disc_plane(view, disc.site.centre, disc.site.frame, spec)
    grey = window.apply(sample_plane(vol.hu, vol.grid, plane, order=1, fill=-1000.0))
    return grey, [(m.mask, m.cls) for m in disc.masks if m.view is view and m.offset_mm == 0.0]


def write_previews(result: StudyResult, vol: Volume, out: Path, window: Windowing, spec: ViewSpec) -> list[Path]:
    """One PNG per level: the mid axial and mid sagittal slices with the model's masks."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for d in result.discs:
        tiles = []
        for view in (View.AXIAL, View.SAGITTAL):
            grey, ms = mid_slice(vol, d, view, window, spec)
            cls = "+".join(c.value for c in d.classes) or "nothing found"
            tiles.append(outlined_tile(grey, ms, f"{d.level} {view.value}: {cls} ({d.confidence:.2f})"))
        sheet = Image.new("RGB", (2 * TILE, TILE))
        for i, t in enumerate(tiles):
            sheet.paste(t, (i * TILE, 0))
        path = out / f"{d.level.replace(' ', '_')}.png"
        sheet.save(path)
        paths.append(path)
    return paths
