"""Training and per-image evaluation, for real, at a tiny scale and offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from node.classes import CLASS_NAMES
from node.cli import main
from node.training.from_phantoms import build_from_phantoms


def tiny_train_args(data: Path, out: Path, imgsz: int = 96) -> list[str]:
    """`idaics train` for one epoch on the CPU at a small size, offline: what tests can afford."""
    return [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--imgsz",
        str(imgsz),
        "--batch",
        "8",
        "--device",
        "cpu",
        "--workers",
        "0",
    ]


@pytest.fixture(scope="module")
def tiny_dataset(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    build_from_phantoms([p.folder for p in phantoms], out, val_fraction=0.34, progress=False)
    return out / "data.yaml"


@pytest.mark.slow
def test_train_one_epoch_then_evaluate(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    model = tmp_path / "models" / "tiny"
    rc = main([*tiny_train_args(tiny_dataset, model), "--fraction", "0.3"])
    assert rc == 0
    card = yaml.safe_load((model / "model.yaml").read_text())
    assert card["classes"] == list(CLASS_NAMES)
    assert card["input_size"] == 96 and card["training"]["epochs"] == 1
    assert card["windowing"]["width"] > 0 and card["views"]["size"] == 512
    assert "not for clinical use" in card["limits"].lower()
    m = card["metrics"]["per_image_val"]
    assert m["images"] > 0
    assert (model / "weights.pt").stat().st_size < 25e6
    assert (model / "training_curves.png").is_file() and (model / "confusion_matrix.png").is_file()
    report = json.loads((model / "metrics.json").read_text())
    assert report["unit"] == "image" and len(report["images"]) == m["images"]
    assert sum(map(sum, report["confusion"])) == m["images"]
    # the card's accuracy is the share of images on the confusion matrix's diagonal
    right = sum(report["confusion"][i][i] for i in range(len(report["confusion"])))
    assert m["accuracy"] == pytest.approx(right / m["images"], abs=1e-3)
    # the evaluate command gives the same figures on the same split
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(model),
                "--data",
                str(tiny_dataset),
                "--out",
                str(tmp_path / "ev"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["confusion"] == report["confusion"]


@pytest.mark.slow
def test_fine_tuning_starts_from_the_given_weights(tiny_dataset, tmp_path):
    import torch

    base = tmp_path / "base"
    assert main([*tiny_train_args(tiny_dataset, base, 64), "--fraction", "0.2"]) == 0
    # with a learning rate of 0 the convolution weights can only be the ones it started from
    tuned = tiny_train_args(tiny_dataset, tmp_path / "tuned", 64)
    assert (
        main([*tuned, "--fraction", "0.2", "--from", str(base / "weights.pt"), "--lr0", "0"]) == 0
    )

    def convs(path):
        model = torch.load(path, map_location="cpu", weights_only=False)["model"].float()
        return {k: v for k, v in model.state_dict().items() if v.ndim == 4}

    a, b = convs(base / "weights.pt"), convs(tmp_path / "tuned" / "weights.pt")
    assert a.keys() == b.keys() and len(a) > 50
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_train_refuses_bad_data(tmp_path, capsys):
    bad = tmp_path / "data.yaml"
    bad.write_text("train: images/train\nval: images/val\nnames: [disc, nothing]\n")
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "unknown class names" in err and "normal, schmorl, bulge, protrusion" in err
    assert (
        main(["train", "--data", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "m")]) == 2
    )
    assert "not found" in capsys.readouterr().err
