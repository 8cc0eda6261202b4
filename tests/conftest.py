"""Shared fixtures: phantom studies made once per session, the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from node.phantom.generate import generate_study

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("IDAICS_SHARED_DATA", ROOT.parent / "shared" / "data"))

# Every DICOM object the project writes must pass strict validation.
pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE

#: (seed, index) pairs whose studies, together, hold every class (checked by a test).
PHANTOMS = [(10, 0), (10, 1), (10, 2)]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared test data not found at {SHARED_DATA} (set IDAICS_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("phantoms")


@pytest.fixture(scope="session")
def phantoms(phantom_root):
    """Three small plain lumbar phantom studies (150 slices each, no ribs or pelvis)."""
    return [
        generate_study(phantom_root, seed, index, slices=150, surroundings=False)
        for seed, index in PHANTOMS
    ]


@pytest.fixture(scope="session")
def phantom(phantoms):
    return phantoms[0]


@pytest.fixture(scope="session")
def analysed_phantoms(phantoms):
    """Each of the three phantoms loaded and analysed with the bundled model, once a session:
    (study, volume, result)."""
    from node.analysis.study import analyze_volume
    from node.analysis.volume import load_folder
    from node.inference.model import load_model
    from node.phantom.generate import SERIES_DIR

    model = load_model(ROOT / "models" / "idaics-v2")
    out = []
    for p in phantoms:
        vol = load_folder(p.folder / SERIES_DIR)
        out.append((p, vol, analyze_volume(vol, model)))
    return out
