"""The synthetic datasets are real COCO 2017 / VOC 2012 datasets whose labels match what is drawn."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tasks.data.synthetic import (
    COCO_2017_CATEGORIES,
    REALISTIC_COCO_CATEGORY_IDS,
    REALISTIC_VOC_SBD_EXTRA,
    REALISTIC_VOC_UNLISTED,
)
from tests.conftest import REALISTIC, SYNTHETIC_COCO
from tools.make_synthetic import (
    COCO_CATEGORY_IDS,
    VOC_CLASSES,
    VOC_PALETTE,
    VOC_SHAPE_CLASSES,
    make_coco,
    make_realistic_coco,
    make_realistic_voc,
    make_voc,
)

REPO = Path(__file__).resolve().parents[1]
TINY = {"num_train": 3, "num_val": 2, "min_size": 96, "max_size": 128}


def _load(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())


def _coco(root: Path, split: str) -> COCO:
    """pycocotools' COCO for one split, turning any warning into an error and muting its prints."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("error")
        coco = COCO(str(root / "annotations" / f"instances_{split}2017.json"))
        coco.createIndex()
    return coco


def _xyxy(box: list[float]) -> list[float]:
    x, y, w, h = box
    return [x, y, x + w, y + h]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -------------------------------------------------------------------------------------------- COCO
@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_loads_in_pycocotools_without_warnings(synthetic_coco: Path, split: str) -> None:
    coco = _coco(synthetic_coco, split)
    assert len(coco.getImgIds()) == SYNTHETIC_COCO[f"num_{split}"]
    assert coco.getAnnIds(), "no annotations at all"
    assert sorted(coco.getCatIds()) == sorted(COCO_CATEGORY_IDS.values())


def test_coco_layout_and_ids(synthetic_coco: Path) -> None:
    train, val = _load(synthetic_coco, "train"), _load(synthetic_coco, "val")
    assert {"info", "licenses", "images", "annotations", "categories"} <= set(train)
    assert [im["id"] for im in train["images"]] == list(range(1, 25))
    assert min(im["id"] for im in val["images"]) == 25  # image ids unique across splits, as in COCO
    ann_ids = [a["id"] for data in (train, val) for a in data["annotations"]]
    assert len(ann_ids) == len(set(ann_ids))
    for split, data in (("train", train), ("val", val)):
        for im in data["images"]:
            assert im["file_name"] == f"{im['id']:012d}.jpg"
            with Image.open(synthetic_coco / f"{split}2017" / im["file_name"]) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                assert image.size == (im["width"], im["height"])
            assert 160 <= im["width"] <= 256 and 160 <= im["height"] <= 256


def test_coco_category_ids_are_not_contiguous(synthetic_coco: Path) -> None:
    ids = sorted(c["id"] for c in _load(synthetic_coco, "train")["categories"])
    assert ids != list(range(1, len(ids) + 1))
    assert len(ids) == 5 and all(c["supercategory"] for c in _load(synthetic_coco, "train")["categories"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_has_empty_images_and_crowd_rle(synthetic_coco: Path, split: str) -> None:
    data = _load(synthetic_coco, split)
    annotated = {a["image_id"] for a in data["annotations"]}
    assert any(im["id"] not in annotated for im in data["images"]), "no image without annotations"
    crowds = [a for a in data["annotations"] if a["iscrowd"] == 1]
    assert crowds, "no crowd annotation"
    for a in crowds:
        assert isinstance(a["segmentation"]["counts"], str)
        image = next(im for im in data["images"] if im["id"] == a["image_id"])
        assert a["segmentation"]["size"] == [image["height"], image["width"]]
    for a in data["annotations"]:
        if a["iscrowd"] == 0:
            assert isinstance(a["segmentation"], list) and a["segmentation"]
            assert all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])


@pytest.mark.parametrize("dataset", ["synthetic_coco", "realistic_coco"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_bbox_and_area_agree_with_segmentation(request: pytest.FixtureRequest, dataset: str, split: str) -> None:
    coco = _coco(request.getfixturevalue(dataset), split)
    for a in coco.dataset["annotations"]:
        image = coco.imgs[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0
        assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
        rle = coco.annToRLE(a)
        # Corners within a pixel: the realistic set's boxes are the polygons' extents (as COCO's),
        # which pixels at the edge cover only partly.
        assert np.allclose(_xyxy(mask_utils.toBbox(rle)), _xyxy(a["bbox"]), atol=1.0), a["id"]
        assert a["area"] == pytest.approx(float(mask_utils.area(rle)), rel=0.01), a["id"]
        if not a["iscrowd"]:  # the polygon's own extent is the box, as in COCO
            points = np.concatenate([np.reshape(p, (-1, 2)) for p in a["segmentation"]])
            assert np.allclose([*points.min(0), *points.max(0)], [x, y, x + w, y + h], atol=1.0), a["id"]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode
def test_coco_annotations_sit_on_drawn_shapes(synthetic_coco: Path) -> None:
    """Each object's mask differs in colour from a thin ring just outside it; a shifted mask would not."""
    coco = _coco(synthetic_coco, "train")
    gaps, shifted_gaps = [], []
    for a in coco.dataset["annotations"]:
        if a["iscrowd"] or a["area"] < 400:
            continue
        info = coco.imgs[a["image_id"]]
        with Image.open(synthetic_coco / "train2017" / info["file_name"]) as image:
            pixels = np.asarray(image, dtype=np.float32)
        mask = coco.annToMask(a)
        for gap_list, mask in ((gaps, mask), (shifted_gaps, np.roll(mask, 6, axis=1))):
            mask_image = Image.fromarray(mask * 255)
            inside = np.asarray(mask_image.filter(ImageFilter.MinFilter(5))) > 0
            near = np.asarray(mask_image.filter(ImageFilter.MaxFilter(7))) > 0
            ring = near & ~(np.asarray(mask_image.filter(ImageFilter.MaxFilter(3))) > 0)
            if inside.any() and ring.any():
                gap_list.append(float(np.linalg.norm(pixels[inside].mean(0) - pixels[ring].mean(0))))
    gaps, shifted_gaps = np.array(gaps), np.array(shifted_gaps)
    assert len(gaps) >= 20
    assert np.median(gaps) > 50 and np.mean(gaps > 20) > 0.9
    assert np.mean(gaps > shifted_gaps) > 0.9


def test_coco_objects_cover_all_coco_size_ranges(synthetic_coco: Path) -> None:
    areas = np.array([a["area"] for a in _load(synthetic_coco, "train")["annotations"] if not a["iscrowd"]])
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas < 96**2)).any() and (areas >= 96**2).any()


def test_coco_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = _files(make_coco(tmp_path / "a", seed=3, **TINY))
    assert first == _files(make_coco(tmp_path / "b", seed=3, **TINY))
    other = _files(make_coco(tmp_path / "c", seed=4, **TINY))
    assert other.keys() == first.keys() and other != first
    assert other["annotations/instances_train2017.json"] != first["annotations/instances_train2017.json"]


def test_plain_sets_are_unchanged(tmp_path: Path) -> None:
    """The README's convergence numbers were measured on these sets: their annotations and masks
    must not change (e.g. a new random draw in the shared drawing code would change them)."""
    coco, voc = make_coco(tmp_path / "coco", seed=3, **TINY), make_voc(tmp_path / "voc", seed=3, **TINY)
    digest = hashlib.sha256()
    for split in ("train", "val"):
        digest.update((coco / "annotations" / f"instances_{split}2017.json").read_bytes())
    assert digest.hexdigest() == "2f580a66550c71a6ffeb386365eff1d77b13a2455bcaafbb9f951b7a75294bf5"
    digest = hashlib.sha256()
    for path in sorted((voc / "VOCdevkit/VOC2012/SegmentationClass").glob("*.png")):
        digest.update(np.asarray(Image.open(path)).tobytes())  # decoded: independent of zlib
    assert digest.hexdigest() == "1edac10c588fa628bb1da7e6f6bccb204a2f1faeb063c1425740a1e0f97a1615"


def test_sizes_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_size <= max_size"):
        make_coco(tmp_path, num_train=1, num_val=0, min_size=300, max_size=200)


# ------------------------------------------------------------------------------- realistic COCO
COCO_GAPS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def test_realistic_coco_has_coco_2017s_categories(realistic_coco: Path) -> None:
    from torchvision.models.detection import SSDLite320_MobileNet_V3_Large_Weights

    # torchvision's COCO names, indexed by category id ("N/A" at the 10 unused ids).
    names = SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.meta["categories"]
    assert len(COCO_2017_CATEGORIES) == 80
    for split in ("train", "val"):
        categories = _load(realistic_coco, split)["categories"]
        assert [c["id"] for c in categories] == [i for i in range(1, 91) if i not in COCO_GAPS]
        assert all(names[c["id"]] == c["name"] and c["supercategory"] for c in categories)
    assert {names[i] for i in COCO_GAPS} == {"N/A"}
    used = {a["category_id"] for split in ("train", "val") for a in _load(realistic_coco, split)["annotations"]}
    assert used == set(REALISTIC_COCO_CATEGORY_IDS.values()) and 90 in used


@pytest.mark.parametrize("split", ["train", "val"])
def test_realistic_coco_loads_in_pycocotools_without_warnings(realistic_coco: Path, split: str) -> None:
    coco = _coco(realistic_coco, split)
    assert len(coco.getImgIds()) == REALISTIC[f"num_{split}"] and len(coco.getCatIds()) == 80


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode
@pytest.mark.parametrize("split", ["train", "val"])
def test_realistic_coco_quirks(realistic_coco: Path, split: str) -> None:
    data = _load(realistic_coco, split)
    assert {"info", "licenses", "images", "annotations", "categories"} <= set(data) and data["licenses"]
    ids = [im["id"] for im in data["images"]]
    assert ids != sorted(ids), "images should not be listed in id order"
    assert sorted(ids) != list(range(1, len(ids) + 1)) and min(ids) > len(ids)
    modes = {}
    for im in data["images"]:
        assert im["file_name"] in (f"{im['id']:012d}.jpg", f"{im['id']:012d}.png")
        with Image.open(realistic_coco / f"{split}2017" / im["file_name"]) as image:
            assert image.size == (im["width"], im["height"]) and max(image.size) <= 256
            modes[image.mode] = image.format
    assert modes == {"RGB": "JPEG", "L": "JPEG", "CMYK": "JPEG", "RGBA": "PNG"}
    annotated = {a["image_id"] for a in data["annotations"]}
    assert set(ids) - annotated, "no image without annotations"
    crowds = [a for a in data["annotations"] if a["iscrowd"]]
    assert {type(a["segmentation"]["counts"]) for a in crowds} == {list, str}  # both RLE forms
    assert all(a["id"] > 2**32 for a in crowds)  # as COCO's crowd annotation ids
    coco = _coco(realistic_coco, split)
    for a in crowds:  # both forms decode to the region their box gives
        mask = coco.annToMask(a)
        ys, xs = np.nonzero(mask)
        np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()], a["bbox"])
        assert mask.sum() == a["area"]
    objects = [a for a in data["annotations"] if not a["iscrowd"]]
    assert all(isinstance(a["segmentation"], list) and a["segmentation"] for a in objects)
    assert any(a["bbox"][2] < 1 for a in objects), "no box narrower than a pixel"


def test_realistic_coco_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = _files(make_realistic_coco(tmp_path / "a", seed=3, **TINY))
    assert first == _files(make_realistic_coco(tmp_path / "b", seed=3, **TINY))
    assert first != _files(make_realistic_coco(tmp_path / "c", seed=4, **TINY))


# --------------------------------------------------------------------------------------------- VOC
def _voc_stems(root: Path, split: str) -> list[str]:
    return (root / "VOCdevkit/VOC2012/ImageSets/Segmentation" / f"{split}.txt").read_text().split()


def test_voc_palette_and_classes() -> None:
    assert len(VOC_PALETTE) == 768 and len(VOC_CLASSES) == 21
    assert VOC_PALETTE[0:3] == [0, 0, 0] and VOC_PALETTE[3:6] == [128, 0, 0]
    assert VOC_PALETTE[15 * 3 : 16 * 3] == [192, 128, 128]  # person
    assert VOC_PALETTE[255 * 3 :] == [224, 224, 192]
    assert len(set(VOC_SHAPE_CLASSES.values())) == 5 and 0 not in VOC_SHAPE_CLASSES.values()


def test_voc_split_files_list_existing_pairs(synthetic_voc: Path) -> None:
    train, val = _voc_stems(synthetic_voc, "train"), _voc_stems(synthetic_voc, "val")
    assert len(train) == 16 and len(val) == 8 and not set(train) & set(val)
    assert _voc_stems(synthetic_voc, "trainval") == train + val
    voc = synthetic_voc / "VOCdevkit/VOC2012"
    for stem in train + val:
        assert (voc / "JPEGImages" / f"{stem}.jpg").is_file()
        assert (voc / "SegmentationClass" / f"{stem}.png").is_file()


@pytest.mark.parametrize("dataset", ["synthetic_voc", "realistic_voc"])
def test_voc_masks_are_palette_pngs_with_void_borders(request: pytest.FixtureRequest, dataset: str) -> None:
    root = request.getfixturevalue(dataset)
    voc = root / "VOCdevkit/VOC2012"
    allowed = {0, 255, *VOC_SHAPE_CLASSES.values()}
    seen: set[int] = set()
    void = objects = 0
    for stem in _voc_stems(root, "trainval"):
        with Image.open(voc / "SegmentationClass" / f"{stem}.png") as mask, Image.open(
            voc / "JPEGImages" / f"{stem}.jpg"
        ) as image:
            assert mask.mode == "P" and image.mode == "RGB" and mask.size == image.size
            assert mask.getpalette()[:768] == VOC_PALETTE
            labels = np.asarray(mask)
        values = set(np.unique(labels).tolist())
        assert values <= allowed, f"{stem}: unexpected labels {values - allowed}"
        assert 255 in values and values - {0, 255}, f"{stem}: no object or no void border"
        seen |= values
        # The void band separates objects from background: no object pixel touches a background one.
        obj = (labels != 0) & (labels != 255)
        assert not (obj[:, 1:] & (labels[:, :-1] == 0)).any()
        assert not (obj[:, :-1] & (labels[:, 1:] == 0)).any()
        void += int((labels == 255).sum())
        objects += int(obj.sum())
    assert seen == allowed
    assert void < objects / 2, "void borders should be thin"  # ~4 px


def _train_aug_stems(root: Path) -> list[str]:
    lines = (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt").read_text().splitlines()
    stems = [Path(line.split()[0]).stem for line in lines]
    assert lines == [f"/JPEGImages/{stem}.jpg /SegmentationClassAug/{stem}.png" for stem in stems]
    return stems


def test_realistic_voc_splits_and_sbd(realistic_voc: Path) -> None:
    voc = realistic_voc / "VOCdevkit/VOC2012"
    train, val = _voc_stems(realistic_voc, "train"), _voc_stems(realistic_voc, "val")
    assert len(train) == REALISTIC["num_train"] and len(val) == REALISTIC["num_val"]
    assert train == sorted(train) and val == sorted(val) and not set(train) & set(val)
    assert max(train) > min(val) and max(val) > min(train), "train and val ids should interleave"
    assert _voc_stems(realistic_voc, "trainval") == sorted(train + val)
    assert len({stem[:4] for stem in train + val}) > 1  # several VOC years
    aug = _train_aug_stems(realistic_voc)
    sbd_only = set(aug) - set(train)
    assert aug == sorted(aug) and set(train) <= set(aug) and not set(aug) & set(val)
    assert len(sbd_only) == REALISTIC_VOC_SBD_EXTRA
    jpegs = {p.stem for p in (voc / "JPEGImages").glob("*.jpg")}
    assert len(jpegs - set(aug) - set(val)) == REALISTIC_VOC_UNLISTED  # detection-only images
    for stem in aug + val:  # SBD's conversion: grey 'L' class-index PNGs
        with Image.open(voc / "SegmentationClassAug" / f"{stem}.png") as mask:
            assert mask.mode == "L"
            labels = np.asarray(mask)
        assert set(np.unique(labels).tolist()) <= {0, 255, *VOC_SHAPE_CLASSES.values()}
        if stem in sbd_only:
            assert not (voc / "SegmentationClass" / f"{stem}.png").exists() and 255 not in labels
        else:  # VOC's own labels, void included, as indices
            with Image.open(voc / "SegmentationClass" / f"{stem}.png") as palette:
                assert np.array_equal(np.asarray(palette), labels) and 255 in labels


def test_realistic_voc_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = _files(make_realistic_voc(tmp_path / "a", seed=3, **TINY))
    assert first == _files(make_realistic_voc(tmp_path / "b", seed=3, **TINY))
    assert first != _files(make_realistic_voc(tmp_path / "c", seed=4, **TINY))


def test_voc_loads_in_torchvision(synthetic_voc: Path) -> None:
    from torchvision.datasets import VOCSegmentation

    dataset = VOCSegmentation(str(synthetic_voc), year="2012", image_set="val")
    image, target = dataset[0]
    with image, target:  # the dataset opens the mask lazily; close it here
        assert len(dataset) == 8 and image.size == target.size and target.mode == "P"


def test_voc_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = _files(make_voc(tmp_path / "a", seed=3, **TINY))
    assert first == _files(make_voc(tmp_path / "b", seed=3, **TINY))
    assert first != _files(make_voc(tmp_path / "c", seed=4, **TINY))


# --------------------------------------------------------------------------------------------- CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "tools" / "make_synthetic.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_cli_help() -> None:
    result = _cli("--help")
    assert result.returncode == 0 and "--num-train" in result.stdout and "--format" in result.stdout


def test_cli_writes_both_formats_and_summarises(tmp_path: Path) -> None:
    sizes = ("--min-size", "96", "--max-size", "128")
    result = _cli("--out", str(tmp_path), "--num-train", "2", "--num-val", "1", *sizes)
    assert result.returncode == 0, result.stderr
    assert "train2017: 2 images" in result.stdout and "val: 1 images" in result.stdout
    assert len(_load(tmp_path / "coco", "val")["images"]) == 1
    assert _voc_stems(tmp_path / "voc", "train") == ["2007_000001", "2007_000002"]


def test_cli_realistic(tmp_path: Path) -> None:
    result = _cli("--out", str(tmp_path), "--realistic")
    assert result.returncode == 0, result.stderr
    assert "train2017: 16 images" in result.stdout and "80 categories, objects of 5" in result.stdout
    assert "train_aug: 24 images" in result.stdout
    assert len(_load(tmp_path / "coco", "train")["categories"]) == 80
    assert _train_aug_stems(tmp_path / "voc")


def test_cli_rejects_bad_sizes(tmp_path: Path) -> None:
    result = _cli("--out", str(tmp_path), "--format", "coco", "--min-size", "300", "--max-size", "200")
    assert result.returncode == 2 and "min_size <= max_size" in result.stderr


def test_loaders_forked_after_generation_do_not_hang(tmp_path: Path) -> None:
    """Writing the data uses OpenCV; DataLoader workers forked afterwards must still run."""
    script = f"""
from pathlib import Path
from tasks.data.synthetic import make_coco
from tasks.data.coco import COCODetectionDataModule
root = make_coco(Path({str(tmp_path)!r}) / "coco", num_train=8, num_val=2)  # default sizes: cv2 goes parallel
data = COCODetectionDataModule(root, image_size=160, batch_size=4, num_workers=2)
data.setup("fit")
batch = next(iter(data.train_dataloader()))
print(tuple(batch["images"].shape))
"""
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("DataLoader workers hung after the synthetic data was written (OpenCV thread pool and fork)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("(4, 3, 160, 160)")
