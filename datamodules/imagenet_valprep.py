"""Sort the flat official ImageNet validation images into ``<wnid>/`` folders (the ImageFolder layout).

The ILSVRC 2012 validation set unpacks to one folder of ``ILSVRC2012_val_00000001.JPEG`` ...
``ILSVRC2012_val_00050000.JPEG``. Given a ground-truth file, this moves each image into a folder named by its
class wnid, which :class:`datamodules.ImageNetDataModule` expects under ``val/``::

    python -m datamodules.imagenet_valprep --val-dir data/imagenet/val --labels LOC_val_solution.csv
    python -m datamodules.imagenet_valprep --val-dir data/imagenet/val --labels val_labels.txt --dry-run

Accepted ground-truth files:

- Kaggle's ``LOC_val_solution.csv``: header ``ImageId,PredictionString``, rows like
  ``ILSVRC2012_val_00008726,n02119789 255 142 454 329 ...`` (the first token is the wnid);
- a plain two-column file ``<file name> <wnid>`` (whitespace- or comma-separated, file name with or without
  its extension).

(The devkit's ``ILSVRC2012_validation_ground_truth.txt`` holds numeric ILSVRC ids, not wnids; convert it
with the devkit's ``meta.mat`` first.) Files are moved, never overwritten: if any destination exists the
command stops before moving anything. Images already in their folder (e.g. from an interrupted run) are
counted and left alone; images in the folder but absent from the ground truth are reported and left in place.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ValPrepError", "ValPrepReport", "main", "read_ground_truth", "sort_val_dir"]

WNID_RE = re.compile(r"^n\d{8}$")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


class ValPrepError(RuntimeError):
    """The ground-truth file or the validation folder cannot be used as given."""


@dataclass
class ValPrepReport:
    """What :func:`sort_val_dir` did (or would do, in a dry run)."""

    moved: int = 0
    already_sorted: int = 0
    missing: list[str] = field(default_factory=list)  # in the ground truth, found nowhere
    unlabelled: list[str] = field(default_factory=list)  # flat images without a ground-truth entry
    classes: int = 0
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would move" if self.dry_run else "moved"
        lines = [
            f"{verb} {self.moved} images into {self.classes} class folders; "
            f"{self.already_sorted} already sorted",
        ]
        if self.missing:
            lines.append(f"{len(self.missing)} images in the ground truth not found, e.g. {self.missing[:3]}")
        if self.unlabelled:
            lines.append(
                f"{len(self.unlabelled)} images without a ground-truth entry left in place, "
                f"e.g. {self.unlabelled[:3]}"
            )
        return "\n".join(lines)


def _stem(name: str) -> str:
    path = Path(name)
    return path.stem if path.suffix.lower() in IMAGE_SUFFIXES else path.name


def read_ground_truth(labels_file: str | Path) -> dict[str, str]:
    """Map image stem (``ILSVRC2012_val_00000001``) to wnid, from a Kaggle CSV or a two-column file."""
    labels_file = Path(labels_file)
    if not labels_file.is_file():
        raise ValPrepError(f"ground-truth file not found: {labels_file}")
    text = labels_file.read_text().splitlines()
    rows: list[tuple[int, str, str]] = []
    if text and text[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        for lineno, row in enumerate(csv.reader(text[1:]), start=2):
            if not row:
                continue
            if len(row) < 2 or not row[1].split():
                raise ValPrepError(f"{labels_file}:{lineno}: expected 'ImageId,PredictionString', got {row}")
            rows.append((lineno, row[0].strip(), row[1].split()[0]))
    else:
        for lineno, line in enumerate(text, start=1):
            parts = line.replace(",", " ").split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) != 2:
                raise ValPrepError(f"{labels_file}:{lineno}: expected '<file name> <wnid>', got {line!r}")
            rows.append((lineno, parts[0], parts[1]))
    mapping: dict[str, str] = {}
    for lineno, name, wnid in rows:
        if not WNID_RE.match(wnid):
            raise ValPrepError(
                f"{labels_file}:{lineno}: {wnid!r} is not a WordNet id like n01440764 (numeric ILSVRC "
                f"ids, as in the devkit's ILSVRC2012_validation_ground_truth.txt, must be mapped to wnids "
                f"first)"
            )
        stem = _stem(name)
        if mapping.get(stem, wnid) != wnid:
            raise ValPrepError(
                f"{labels_file}:{lineno}: {stem} listed with two classes, {mapping[stem]} and {wnid}"
            )
        mapping[stem] = wnid
    if not mapping:
        raise ValPrepError(f"{labels_file}: no ground-truth entries found")
    return mapping


def sort_val_dir(val_dir: str | Path, labels_file: str | Path, dry_run: bool = False) -> ValPrepReport:
    """Move ``val_dir/<image>`` to ``val_dir/<wnid>/<image>`` for every image in the ground truth."""
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise ValPrepError(f"validation folder not found: {val_dir}")
    truth = read_ground_truth(labels_file)
    flat = {
        _stem(p.name): p
        for p in sorted(val_dir.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    }
    report = ValPrepReport(dry_run=dry_run)
    moves: list[tuple[Path, Path]] = []
    for stem, wnid in sorted(truth.items()):
        source = flat.get(stem)
        if source is None:
            if any((val_dir / wnid).glob(f"{stem}.*")):
                report.already_sorted += 1
            else:
                report.missing.append(stem)
            continue
        moves.append((source, val_dir / wnid / source.name))
    report.unlabelled = sorted(stem for stem in flat if stem not in truth)
    conflicts = [str(dest) for _, dest in moves if dest.exists()]
    if conflicts:
        raise ValPrepError(
            f"refusing to overwrite {len(conflicts)} existing file(s), e.g. {conflicts[:3]}; "
            f"nothing was moved. Remove the duplicates (the flat copy or the sorted one) and rerun."
        )
    report.moved = len(moves)
    report.classes = len({dest.parent.name for _, dest in moves})
    if not dry_run:
        for source, dest in moves:
            dest.parent.mkdir(exist_ok=True)
            source.rename(dest)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 success, 1 error)."""
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.imagenet_valprep",
        description="Sort the flat ImageNet validation images into <wnid>/ folders by a ground-truth file.",
    )
    parser.add_argument(
        "--val-dir", required=True, help="folder with ILSVRC2012_val_*.JPEG (sorted in place)"
    )
    parser.add_argument(
        "--labels",
        required=True,
        help="Kaggle LOC_val_solution.csv, or a two-column '<file name> <wnid>' file",
    )
    parser.add_argument("--dry-run", action="store_true", help="report what would be moved, move nothing")
    args = parser.parse_args(argv)
    try:
        report = sort_val_dir(args.val_dir, args.labels, dry_run=args.dry_run)
    except ValPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
