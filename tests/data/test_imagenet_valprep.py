"""`python -m datamodules.imagenet_valprep`: sorting the flat validation folder into class folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import datagen
import pytest

from datamodules.imagenet_valprep import main as valprep_main

pytestmark = pytest.mark.filterwarnings("ignore::datamodules.errors.DatasetSizeWarning")

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- valprep
WNIDS = ["n01440764", "n01443537", "n01440764", "n01484850", "n01443537"]


@pytest.mark.parametrize("labels_format", ["kaggle", "plain"])
def test_valprep_sorts_files(tmp_path, labels_format, capsys):
    val_dir, labels = datagen.make_flat_imagenet_val(tmp_path / "val", WNIDS, labels_format=labels_format)
    assert valprep_main(["--val-dir", str(val_dir), "--labels", str(labels), "--dry-run"]) == 0
    assert "would move 5 images into 3 class folders" in capsys.readouterr().out
    assert len(list(val_dir.glob("*.JPEG"))) == 5  # dry run moves nothing

    assert valprep_main(["--val-dir", str(val_dir), "--labels", str(labels)]) == 0
    assert "moved 5 images into 3 class folders" in capsys.readouterr().out
    assert not list(val_dir.glob("*.JPEG"))
    for i, wnid in enumerate(WNIDS, start=1):
        assert (val_dir / wnid / f"ILSVRC2012_val_{i:08d}.JPEG").is_file()

    assert valprep_main(["--val-dir", str(val_dir), "--labels", str(labels)]) == 0  # rerun: nothing to do
    assert "moved 0 images into 0 class folders; 5 already sorted" in capsys.readouterr().out


def test_valprep_refuses_to_overwrite(tmp_path, capsys):
    val_dir, labels = datagen.make_flat_imagenet_val(tmp_path / "val", WNIDS)
    clash = val_dir / WNIDS[1] / "ILSVRC2012_val_00000002.JPEG"
    clash.parent.mkdir()
    clash.write_bytes(b"existing")
    assert valprep_main(["--val-dir", str(val_dir), "--labels", str(labels)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert len(list(val_dir.glob("*.JPEG"))) == 5 and clash.read_bytes() == b"existing"


def test_valprep_rejects_numeric_ground_truth(tmp_path, capsys):
    val_dir, _ = datagen.make_flat_imagenet_val(tmp_path / "val", WNIDS[:2])
    numeric = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    numeric.write_text("ILSVRC2012_val_00000001.JPEG 490\nILSVRC2012_val_00000002.JPEG 361\n")
    assert valprep_main(["--val-dir", str(val_dir), "--labels", str(numeric)]) == 1
    assert "not a WordNet id" in capsys.readouterr().err


def test_valprep_runs_as_module(tmp_path):
    val_dir, labels = datagen.make_flat_imagenet_val(tmp_path / "val", WNIDS[:2], labels_format="plain")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "datamodules.imagenet_valprep",
            "--val-dir",
            str(val_dir),
            "--labels",
            str(labels),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "moved 2 images" in result.stdout and (val_dir / WNIDS[1] / "ILSVRC2012_val_00000002.JPEG").is_file()
    )
