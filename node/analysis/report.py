"""What `idaics analyze` shows and writes: the per-level table, JSON and preview pictures."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from node.analysis.study import DiscResult, StudyResult
from node.analysis.views import disc_plane
from node.analysis.volume import Volume
from node.classes import CLASS_COLOURS, DiscClass
from node.geometry import sample_plane
from node.inference.interface import View, ViewSpec, Windowing

TILE = 320


def table(result: StudyResult | dict) -> str:
    """The per-level table, from a result or its JSON form (``StudyResult.to_dict()``)."""
    d = result.to_dict() if isinstance(result, StudyResult) else result
    lines = [
        f"{'level':<8} {'classes':<22} {'conf':>5} {'ext mm':>7} {'share':>6} {'area mm2':>9}  warnings"
    ]
    for lv in d.get("levels", []):
        m = lv.get("measurements", {})
        ext = f"{m['extension_mm']:.1f}" if m.get("extension_mm") is not None else "-"
        share = (
            f"{m['extension_share'] * 100:.0f}%" if m.get("extension_share") is not None else "-"
        )
        area = f"{m['disc_area_mm2']:.0f}" if m.get("disc_area_mm2") is not None else "-"
        cls = "+".join(lv["classes"]) or "-"
        lines.append(
            f"{lv['level']:<8} {cls:<22} {lv['confidence']:>5.2f} {ext:>7} {share:>6} {area:>9}  "
            f"{'; '.join(lv.get('warnings', []))}"
        )
    if not d.get("levels"):
        lines.append("(no disc found)")
    for w in d.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def write_json(result: StudyResult, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=1))
    os.replace(tmp, path)


def outlined_tile(
    grey: np.ndarray, masks: Iterable[tuple[np.ndarray, DiscClass]], caption: str, size: int = TILE
) -> Image.Image:
    """A greyscale slice with each ``(mask, DiscClass)`` outlined in its class colour,
    resized to ``size`` and captioned."""
    rgb = np.repeat(grey[..., None], 3, axis=2).copy()
    for mask, cls in masks:
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(rgb, contours, -1, CLASS_COLOURS[cls], 2)
    img = Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR)
    ImageDraw.Draw(img).text((6, 4), caption, fill=(255, 255, 0), font=ImageFont.load_default())
    return img


def mid_slice(
    vol: Volume, disc: DiscResult, view: View, window: Windowing, spec: ViewSpec
) -> tuple[np.ndarray, list[tuple[np.ndarray, DiscClass]]]:
    """The windowed mid slice of one view through a disc, and the model's ``(mask, class)``
    pairs drawn on it."""
    plane = disc_plane(view, disc.site.centre, disc.site.frame, spec)
    grey = window.apply(sample_plane(vol.hu, vol.grid, plane, order=1, fill=-1000.0))
    return grey, [(m.mask, m.cls) for m in disc.masks if m.view is view and m.offset_mm == 0.0]


SPINE_WINDOW = Windowing(center=500.0, width=1500.0)  # bone: -250 to 1250 HU


def spine_picture(result: StudyResult, vol: Volume) -> Image.Image | None:
    """A sagittal picture of the column (following it sideways, 1 mm pixels), each disc found
    marked across its plane with its name: where the node found the discs and what it
    called them."""
    line = result.column
    if len(line) < 2:
        return None
    z = np.arange(line[:, 2].max() + 25.0, line[:, 2].min() - 25.0, -1.0)
    rev = line[::-1]
    x = np.interp(z, rev[:, 2], rev[:, 0])
    y0 = float(np.interp(z, rev[:, 2], rev[:, 1]).mean())
    y = np.arange(y0 - 90.0, y0 + 90.0, 1.0)
    zz, yy = np.meshgrid(z, y, indexing="ij")
    pts = np.stack([np.broadcast_to(x[:, None], zz.shape), yy, zz], axis=-1).reshape(-1, 3)
    hu = ndimage.map_coordinates(
        vol.hu, vol.grid.to_index(pts).T, order=1, mode="constant", cval=-1000.0
    )
    grey = SPINE_WINDOW.apply(hu.reshape(zz.shape))
    img = Image.fromarray(grey).convert("RGB")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for d in result.discs:
        c, ap = d.site.centre, d.site.frame[:, 1]
        ends = [c - ap * 22.0, c + ap * 22.0]
        px = [(float(e[1] - y[0]), float(z[0] - e[2])) for e in ends]
        colour = CLASS_COLOURS[d.classes[0]] if d.classes else (255, 255, 0)
        draw.line(px, fill=colour, width=2)
        draw.text((max(2.0, px[0][0] - 50), px[0][1] - 12), d.level, fill=(255, 255, 0), font=font)
    return img.resize((img.width * 2, img.height * 2), Image.Resampling.BILINEAR)


def write_previews(
    result: StudyResult, vol: Volume, out: Path, window: Windowing, spec: ViewSpec
) -> list[Path]:
    """One PNG per level (the mid axial and mid sagittal slices with the model's masks), and
    ``spine.png``, the column with the discs found and their names."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    overview = spine_picture(result, vol)
    if overview is not None:
        overview.save(out / "spine.png")
        paths.append(out / "spine.png")
    for d in result.discs:
        tiles = []
        for view in (View.AXIAL, View.SAGITTAL):
            grey, ms = mid_slice(vol, d, view, window, spec)
            cls = "+".join(c.value for c in d.classes) or "nothing found"
            tiles.append(
                outlined_tile(grey, ms, f"{d.level} {view.value}: {cls} ({d.confidence:.2f})")
            )
        sheet = Image.new("RGB", (2 * TILE, TILE))
        for i, t in enumerate(tiles):
            sheet.paste(t, (i * TILE, 0))
        path = out / f"{d.level.replace(' ', '_')}.png"
        sheet.save(path)
        paths.append(path)
    return paths
