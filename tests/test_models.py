"""From the hospital's corrections to a promoted model, end to end: the node analyses, a
radiologist's corrected SEG comes back, a dataset is built from the cases, a candidate is
fine-tuned, scored on the frozen test split, refused by the gate, promoted by force, and
the next job runs on it and names it."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
import yaml

from node.classes import DiscClass
from node.cli import DEFAULT_MODEL, main
from node.config import Settings
from node.db import State
from node.inference.model import read_card
from node.phantom.generate import SERIES_DIR
from node.registry import REGISTRY_FILE, Registry, wilson
from node.training.from_cases import SPLITS_FILE, TEST_STUDIES
from node.web.app import job_detail
from tests.test_cases import corrected, wait_series
from tests.test_service import in_pacs, jobs, orthanc, start_node, storescu, wait_job
from tests.test_training import tiny_train_args

FINAL = (State.DONE, State.FAILED, State.SKIPPED)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def _series(study) -> str:
    return str(pydicom.dcmread(next((study.folder / SERIES_DIR).iterdir())).SeriesInstanceUID)


def _job(home: Path, job_id: int):
    return next(j for j in jobs(home) if j.id == job_id)


def _texts(ds) -> set[str]:
    """Every text value of an SR's content tree."""
    out = set()
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            out.add(str(item.TextValue))
        out |= _texts(item)
    return out


def _correct(node, job, study_dir: Path, tmp: Path) -> None:
    own = pydicom.dcmread(Path(job.outputs_dir) / "dicom" / "seg.dcm")
    said = {lv["level"]: lv["classes"] for lv in job.result["levels"]}
    pick = [lv for lv, cls in said.items() if "schmorl" not in cls][:2]
    changes = {
        lv: DiscClass.BULGE if "protrusion" in said[lv] else DiscClass.PROTRUSION for lv in pick
    }
    fixed = corrected(own, changes)
    folder = tmp / f"corrected-{job.id}"
    folder.mkdir()
    fixed.save_as(folder / "seg.dcm", enforce_file_format=True)
    assert storescu(node, folder).returncode == 0
    done = wait_series(node.home, fixed.SeriesInstanceUID)
    assert done.state is State.DONE, done.reason


@pytest.mark.slow
def test_from_corrections_to_a_gated_promotion_and_the_next_job_on_the_new_model(
    phantoms, pacs, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    node, cfg = start_node(tmp_path / "node", pacs)
    home = node.home
    config = home / "node.toml"
    try:
        analysed = []
        for study in phantoms[:2]:
            assert storescu(node, study.folder / SERIES_DIR).returncode == 0
            job = wait_series(home, _series(study), 180)
            assert job.state is State.DONE, job.reason
            assert job.result["model"] == "idaics-v2" and job.result["model_version"] == "2.0.0"
            analysed.append(job)
        # the first patient's case is held out for good; the second one's is for training
        cases = home / "cases"
        cases.mkdir(exist_ok=True)
        (cases / SPLITS_FILE).write_text(
            json.dumps({"patients": {"PHANTOM-10-0": "test", "PHANTOM-10-1": "train"}})
        )
        for job, study in zip(analysed, phantoms):
            _correct(node, job, study.folder, tmp_path)

        ds = tmp_path / "ds"
        assert main(["dataset", "build", "--source", "cases", str(cases), "--out", str(ds)]) == 0
        data = yaml.safe_load((ds / "data.yaml").read_text())
        assert data["idaics"]["studies"] == {
            "train": ["case-00002"],
            "val": [],
            "test": ["case-00001"],
        }
        assert [p.name for p in (ds / TEST_STUDIES).iterdir()] == ["case-00001"]

        # a candidate fine-tuned for one epoch from the bundled model (small: it will be worse)
        cand = home / "models" / "candidate"
        train = tiny_train_args(ds / "data.yaml", cand)
        assert main([*train, "--from", str(DEFAULT_MODEL / "weights.pt")]) == 0
        version = read_card(cand).version
        assert version != "2.0.0"
        capsys.readouterr()

        models = ["--config", str(config), "models"]
        assert main([*models, "evaluate", "candidate"]) == 0
        assert main([*models, "list"]) == 0
        listing = capsys.readouterr().out
        assert "* idaics-v2" in listing and f"  candidate            {version}" in listing

        settings = Settings(home=home, receiver={"min_free_mb": 10})
        reg = Registry(settings)
        cand_score, live_score = reg.score("candidate"), reg.score("idaics-v2")
        assert cand_score is not None and live_score is None  # the live one is scored when asked
        assert cand_score.cases == ("case-00001",) and cand_score.discs >= 5

        rc = main([*models, "promote", "candidate"])
        err = capsys.readouterr().err
        live_score = reg.score("idaics-v2")
        assert live_score is not None and live_score.split == cand_score.split
        worse = (cand_score.accuracy, cand_score.kappa) < (live_score.accuracy, live_score.kappa)
        assert worse, (cand_score, live_score)  # one epoch at 96 px from the bundled model
        assert rc == 3 and "not promoted: worse than the live model" in err, err
        assert not (reg.root / REGISTRY_FILE).is_file() and reg.live_name() == "idaics-v2"

        assert main([*models, "promote", "candidate", "--force"]) == 0
        assert "live model: candidate" in capsys.readouterr().out
        state = reg.state()
        assert state["live"] == "candidate" and state["history"][-1]["forced"] is True
        # the model that was live runs in the shadow of the new one
        assert main([*models, "shadow", "idaics-v2"]) == 0
        assert main([*models, "shadow", "candidate"]) == 3  # the live one has no shadow of itself
        assert "is the live model" in capsys.readouterr().err

        # the next job runs on the promoted model and its SR names the version; the shadow's
        # results are kept beside it and never sent
        third = phantoms[2]
        assert storescu(node, third.folder / SERIES_DIR).returncode == 0
        job = wait_series(home, _series(third), 180)
        assert job.state is State.DONE, job.reason
        assert job.result["model"] == "candidate" and job.result["model_version"] == version
        (sr,) = [
            s
            for s in in_pacs(pacs, third.truth["study_instance_uid"], "SR")
            if s.SeriesDescription != "IDAICS report: series not analysed"
        ]
        assert version in _texts(sr) and "2.0.0" not in _texts(sr)
        assert len(in_pacs(pacs, third.truth["study_instance_uid"], "SEG")) <= 1
        # the shadow runs after the live results are handed to the sender: it may finish later
        wait_job(home, lambda _: "shadow" in (_job(home, job.id).result or {}), 120)
        job = _job(home, job.id)
        shadow = job.result["shadow"]
        assert shadow["model"] == "idaics-v2" and shadow["model_version"] == "2.0.0"
        live_levels = [lv["level"] for lv in job.result["levels"]]
        assert [r["level"] for r in shadow["levels"]][: len(live_levels)] == live_levels
        for r, lv in zip(shadow["levels"], job.result["levels"]):
            assert r["live"] == lv["classes"] and r["agree"] == (
                sorted(r["shadow"] or []) == sorted(lv["classes"])
            )
        page = job_detail(job, False)
        assert page["shadow"] == shadow and page["model_version"] == version
        capsys.readouterr()
        assert main([*models, "compare"]) == 0
        printed = capsys.readouterr().out
        assert (
            f"shadow idaics-v2 2.0.0: 1 jobs, {len(shadow['levels'])} levels, agrees on {shadow['agree']}"
            in printed
        )
    finally:
        node.stop()

    assert main([*models, "rollback"]) == 0
    assert reg.live_name() == "idaics-v2" and reg.state()["history"][-1]["action"] == "rollback"
    assert reg.shadow() is None  # the model rolled back to was the shadow: it is live now


def test_the_accuracy_interval_is_wilsons():
    lo, hi = wilson(45, 50)
    assert lo == pytest.approx(0.7864, abs=1e-3) and hi == pytest.approx(0.9565, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_the_registry_refuses_what_it_cannot_do_and_says_why(tmp_path):
    import shutil

    from node.inference.model import ModelError
    from node.registry import GateError

    settings = Settings(home=tmp_path, receiver={"min_free_mb": 10})
    reg = Registry(settings)
    assert reg.live() == settings.model and reg.shadow() is None  # no registry yet: bundled
    with pytest.raises(GateError, match="never been changed"):
        reg.rollback()
    with pytest.raises(GateError, match="no model 'nope'"):
        reg.set_shadow("nope")
    with pytest.raises(GateError, match="is the live model"):
        reg.set_shadow("idaics-v2")
    with pytest.raises(GateError, match="already the live model"):
        reg.promote("idaics-v2", tmp_path / "cases")
    copy = reg.root / "copy"
    shutil.copytree(DEFAULT_MODEL, copy)
    with pytest.raises(GateError, match="frozen test split holds no case"):
        reg.promote("copy", tmp_path / "cases")
    reg.set_shadow("copy")
    assert reg.shadow() == copy and reg.live() == settings.model
    # the live model's folder removed under the registry: a clear error, not another model
    state = reg.state()
    state["live"] = "gone"
    reg._write(state)
    with pytest.raises(ModelError, match="the live model 'gone' is not in"):
        reg.live()
