"""Write small synthetic datasets in the real COCO 2017 and PASCAL VOC 2012 layouts.

Five shape classes with random size, rotation, occlusion and background (random colour in the VOC
set, a typical hue per class in the calmer COCO set); a few images without objects and a few crowd
regions (the generator itself is ``tasks/data/synthetic.py``). ``--realistic`` writes small sets
with the real datasets' quirks instead: COCO's 80 categories under their real ids (1..90 with
gaps), crowd regions in both RLE forms, greyscale / CMYK / RGBA images, sparse image ids; VOC
with void borders, interleaved splits and SBD's ``SegmentationClassAug`` + ``train_aug.txt``.

    python tools/make_synthetic.py --out data/synthetic                  # DIR/coco and DIR/voc
    python tools/make_synthetic.py --out data/synthetic --format coco --num-train 100 --seed 1
    python tools/make_synthetic.py --out data/realistic --realistic      # 16 train / 8 val each
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.data.synthetic import (  # noqa: E402  (re-exported for callers of this tool)
    COCO_CATEGORY_IDS,
    SHAPES,
    VOC_CLASSES,
    VOC_IGNORE_INDEX,
    VOC_PALETTE,
    VOC_SHAPE_CLASSES,
    make_coco,
    make_realistic_coco,
    make_realistic_voc,
    make_voc,
)

__all__ = [
    "COCO_CATEGORY_IDS", "SHAPES", "VOC_CLASSES", "VOC_IGNORE_INDEX", "VOC_PALETTE",
    "VOC_SHAPE_CLASSES", "make_coco", "make_realistic_coco", "make_realistic_voc", "make_voc", "main",
]  # fmt: skip


# --------------------------------------------------------------------------------------------- CLI
def _coco_summary(root: Path) -> list[str]:
    lines = [f"coco: wrote {root}/{{train,val}}2017/*.jpg and annotations/instances_{{train,val}}2017.json"]
    for split in ("train", "val"):
        data = json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())
        names = {c["id"]: c["name"] for c in data["categories"]}
        objects = Counter(names[a["category_id"]] for a in data["annotations"] if not a["iscrowd"])
        crowds = sum(a["iscrowd"] for a in data["annotations"])
        empty = len(data["images"]) - len({a["image_id"] for a in data["annotations"]})
        shown = sorted(names) if len(names) <= len(SHAPES) else sorted(i for i in names if objects[names[i]])
        per_class = ", ".join(f"{names[i]}({i}) {objects[names[i]]}" for i in shown)
        if len(shown) < len(names):
            per_class = f"{len(names)} categories, objects of {len(shown)}: {per_class}"
        lines.append(
            f"  {split}2017: {len(data['images'])} images ({empty} without objects), "
            f"{sum(objects.values())} objects + {crowds} crowd regions; {per_class}"
        )
    return lines


def _voc_summary(root: Path) -> list[str]:
    voc = root / "VOCdevkit" / "VOC2012"
    sbd = (voc / "ImageSets" / "Segmentation" / "train_aug.txt").is_file()
    folders = "JPEGImages,SegmentationClass,SegmentationClassAug" if sbd else "JPEGImages,SegmentationClass"
    lines = [f"voc: wrote {voc}/{{{folders},ImageSets/Segmentation}}"]
    for split in ("train", "val", "train_aug") if sbd else ("train", "val"):
        lines_of_split = (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().splitlines()
        stems = [Path(line.split()[0]).stem for line in lines_of_split if line.strip()]
        mask_dir = voc / ("SegmentationClassAug" if split.endswith("_aug") else "SegmentationClass")
        present: Counter[int] = Counter()
        for stem in stems:
            with Image.open(mask_dir / f"{stem}.png") as mask:
                present.update(np.unique(np.asarray(mask)).tolist())
        per_class = ", ".join(f"{VOC_CLASSES[c]}={s} {present[c]}" for s, c in VOC_SHAPE_CLASSES.items())
        lines.append(f"  {split}: {len(stems)} images; images showing each class: {per_class}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (``sys.argv[1:]`` when None), write the datasets and print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/coco and/or OUT/voc")
    parser.add_argument("--format", choices=("coco", "voc", "both"), default="both")
    parser.add_argument(
        "--realistic", action="store_true",
        help="small sets with the real datasets' quirks (80 COCO categories, crowd RLE, grey/CMYK/RGBA, SBD)",
    )  # fmt: skip
    parser.add_argument("--num-train", type=int, help="train images (default: coco 400, voc 300; realistic 16)")
    parser.add_argument("--num-val", type=int, help="val images (default: 50; realistic 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-size", type=int, help="smallest image side (default: coco 240, voc 200; realistic 160)"
    )
    parser.add_argument(
        "--max-size", type=int, help="largest image side (default: coco 400, voc 320; realistic 256)"
    )
    args = parser.parse_args(argv)
    given = {
        key: value
        for key, value in (("num_train", args.num_train), ("num_val", args.num_val),
                           ("min_size", args.min_size), ("max_size", args.max_size))
        if value is not None
    }  # fmt: skip
    try:
        makers = (make_realistic_coco, make_realistic_voc) if args.realistic else (make_coco, make_voc)
        for name, make, summary in (("coco", makers[0], _coco_summary), ("voc", makers[1], _voc_summary)):
            if args.format in (name, "both"):
                start = time.perf_counter()
                root = make(args.out / name, seed=args.seed, **given)
                print("\n".join(summary(root)) + f"\n  ({time.perf_counter() - start:.1f} s)")
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
