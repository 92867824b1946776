"""tasks/data/coco.py and detection_transforms.py: label maps, batches, boxes that follow the image."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

import tasks.data.synthetic
from tasks.data.coco import COCODetection, COCODetectionDataModule, collate_detection, load_coco_annotations
from tasks.data.detection_transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MinIoURandomCrop,
    ZoomOut,
    detection_eval_transform,
    detection_train_transform,
)

SIZE = 128


def datamodule(root: Path, **kwargs) -> COCODetectionDataModule:
    options = {"image_size": SIZE, "batch_size": 4, "num_workers": 0, **kwargs}
    return COCODetectionDataModule(root, **options)


def annotations(root: Path, split: str = "val2017") -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_label_maps_both_ways(synthetic_coco: Path) -> None:
    dm = datamodule(synthetic_coco)
    # COCO category ids are not contiguous: labels 1..5 stand for ids 1, 3, 7, 12, 44.
    assert dm.label_to_category_id == {1: 1, 2: 3, 3: 7, 4: 12, 5: 44}
    assert dm.category_id_to_label == {1: 1, 3: 2, 7: 3, 12: 4, 44: 5}
    assert dm.class_names == {1: "circle", 2: "square", 3: "triangle", 4: "cross", 5: "ring"}
    assert dm.num_classes == 6
    ids = datamodule(synthetic_coco, contiguous_labels=False)
    assert ids.label_to_category_id == {1: 1, 3: 3, 7: 7, 12: 12, 44: 44}
    assert ids.num_classes == 45


def test_validation_batches_resize_only_and_keep_every_image(synthetic_coco: Path) -> None:
    dm = datamodule(synthetic_coco)
    dm.setup("validate")
    gt = annotations(synthetic_coco)
    assert len(dm.datasets["val"]) == len(gt["images"])  # images without objects included
    images = {image["id"]: image for image in gt["images"]}
    label_of = dm.category_id_to_label
    seen = 0
    for batch in dm.val_dataloader():
        assert set(batch) == {"images", "targets", "image_ids", "orig_sizes"}
        n = len(batch["image_ids"])
        assert batch["images"].shape == (n, 3, SIZE, SIZE) and batch["images"].dtype == torch.uint8
        for image_id, orig_size, target in zip(
            batch["image_ids"].tolist(), batch["orig_sizes"].tolist(), batch["targets"]
        ):
            info = images[image_id]
            assert orig_size == [info["height"], info["width"]]
            scale = np.array([SIZE / info["width"], SIZE / info["height"]] * 2)
            anns = [a for a in gt["annotations"] if a["image_id"] == image_id]
            objects = [a for a in anns if not a["iscrowd"]]
            crowds = [a for a in anns if a["iscrowd"]]
            expected = np.array(
                [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in objects)]
            ).reshape(-1, 4)
            np.testing.assert_allclose(target["boxes"].numpy(), np.clip(expected * scale, 0, SIZE), atol=1e-3)
            assert target["labels"].tolist() == [label_of[a["category_id"]] for a in objects]
            assert target["labels"].dtype == torch.int64
            assert len(target["crowd_boxes"]) == len(crowds)  # crowd regions travel apart
            seen += 1
    assert seen == len(gt["images"])
    normalised = dm.on_after_batch_transfer(batch, 0)["images"]
    assert normalised.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    torch.testing.assert_close(normalised, (batch["images"].float() - mean) / std)


def test_training_drops_images_without_objects_unless_asked(synthetic_coco: Path) -> None:
    gt = annotations(synthetic_coco, "train2017")
    with_objects = {a["image_id"] for a in gt["annotations"] if not a["iscrowd"]}
    assert len(with_objects) < len(gt["images"])  # the generator makes some empty images
    dropped = datamodule(synthetic_coco)
    dropped.setup("fit")
    assert {r["image_id"] for r in dropped.datasets["train"].records} == with_objects
    kept = datamodule(synthetic_coco, keep_empty_images=True)
    kept.setup("fit")
    assert len(kept.datasets["train"]) == len(gt["images"])
    batch = next(iter(kept.train_dataloader()))
    assert batch["images"].shape == (4, 3, SIZE, SIZE)
    for target in batch["targets"]:
        boxes = target["boxes"]
        assert boxes.shape[1] == 4 and len(boxes) == len(target["labels"])
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert ((boxes >= 0) & (boxes <= SIZE)).all()


def test_degenerate_boxes_are_dropped_and_counted(synthetic_coco: Path, tmp_path: Path, caplog) -> None:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / split).symlink_to(synthetic_coco / split)
        shutil.copy(synthetic_coco / "annotations" / f"instances_{split}.json", root / "annotations")
    gt = annotations(root, "train2017")
    image = next(i for i in gt["images"] if any(a["image_id"] == i["id"] for a in gt["annotations"]))
    next_id = max(a["id"] for a in gt["annotations"]) + 1
    bad = [[10, 10, 0, 5], [image["width"] + 5, 3, 10, 10]]  # zero width; entirely outside the image
    for offset, bbox in enumerate(bad):
        gt["annotations"].append(
            {
                "id": next_id + offset,
                "image_id": image["id"],
                "category_id": 3,
                "bbox": bbox,
                "area": 1.0,
                "iscrowd": 0,
                "segmentation": [[0, 0, 1, 0, 1, 1]],
            }
        )
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(gt))
    dm = datamodule(root)
    with caplog.at_level(logging.WARNING, logger="tasks.data.coco"):
        dm.setup("fit")
    assert dm.datasets["train"].num_dropped_boxes == 2
    assert "dropped 2 degenerate boxes" in caplog.text
    record = next(r for r in dm.datasets["train"].records if r["image_id"] == image["id"])
    original = [
        a
        for a in annotations(synthetic_coco, "train2017")["annotations"]
        if a["image_id"] == image["id"] and not a["iscrowd"]
    ]
    assert len(record["boxes"]) == len(original)


def test_missing_files_are_named(synthetic_coco: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        datamodule(tmp_path / "nowhere").setup("fit")
    (tmp_path / "empty" / "annotations").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"instances_val2017\.json"):
        datamodule(tmp_path / "empty").setup("validate")
    shutil.copy(synthetic_coco / "annotations" / "instances_val2017.json", tmp_path / "empty" / "annotations")
    with pytest.raises(FileNotFoundError, match=r"empty/val2017"):
        datamodule(tmp_path / "empty").setup("validate")


def test_synthetic_flag_writes_the_data_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = tasks.data.synthetic.make_coco

    def small(root: Path, **_: object) -> Path:
        calls.append(root)
        return real(root, num_train=6, num_val=2, min_size=96, max_size=128)

    monkeypatch.setattr(tasks.data.synthetic, "make_coco", small)
    dm = datamodule(tmp_path / "synth", synthetic=True)
    dm.prepare_data()
    dm.prepare_data()  # already there: not rewritten
    assert calls == [tmp_path / "synth"]
    dm.setup("validate")
    assert len(dm.datasets["val"]) == 2


# ------------------------------------------------------------------------------- augmentation
def _picture(height: int = 120, width: int = 200) -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    boxes = np.array([[20, 30, 70, 90], [120, 10, 190, 60]], dtype=np.float32)
    for x1, y1, x2, y2 in boxes.astype(int):
        image[y1:y2, x1:x2] = 255
    return image, boxes


def test_training_boxes_stay_on_their_objects() -> None:
    image, boxes = _picture()
    transform = detection_train_transform(96, photometric_p=0.0, zoom_out_p=0.7, zoom_out_max_scale=2.0)
    changed = 0
    for seed in range(40):
        transform.set_random_seed(seed)
        out = transform(image=image, bboxes=boxes, labels=[1, 2], is_crowd=[0, 0])
        assert out["image"].shape == (96, 96, 3)
        white = out["image"][..., 0] > 190
        for box in np.asarray(out["bboxes"]):
            x1, y1, x2, y2 = box
            assert x2 > x1 and y2 > y1
            inside = white[int(np.ceil(y1)) : int(y2), int(np.ceil(x1)) : int(x2)]
            # The box holds its white rectangle: filled inside, and no white just outside it.
            assert inside.size == 0 or inside.mean() > 0.9
            ring = white[max(0, int(y1) - 3) : int(y2) + 3, max(0, int(x1) - 3) : int(x2) + 3].sum()
            assert (
                ring - white[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))].sum() <= 0.05 * ring + 4
            )
        changed += not np.allclose(
            np.asarray(out["bboxes"]).reshape(-1, 4), boxes * np.array([96 / 200, 96 / 120] * 2), atol=0.5
        )
    assert changed > 20  # the augmentation really moves things


def test_min_iou_crop_meets_its_minimum_and_keeps_centres() -> None:
    crop = MinIoURandomCrop(min_ious=(0.5,), max_trials=1000)
    box = np.array([[0.2, 0.2, 0.7, 0.8]])  # normalised, as albumentations passes it
    for seed in range(30):
        crop.set_random_seed(seed)
        x1, y1, x2, y2 = crop.get_params_dependent_on_data({"shape": (100, 200, 3)}, {"bboxes": box})[
            "crop_coords"
        ]
        bx1, by1, bx2, by2 = box[0] * [200, 100, 200, 100]
        inter = max(0, min(x2, bx2) - max(x1, bx1)) * max(0, min(y2, by2) - max(y1, by1))
        iou = inter / ((x2 - x1) * (y2 - y1) + (bx2 - bx1) * (by2 - by1) - inter)
        assert iou >= 0.5
        assert x1 < (bx1 + bx2) / 2 < x2 and y1 < (by1 + by2) / 2 < y2
    # Boxes whose centre leaves the patch are dropped (SSD), the others clipped to it.
    kept = crop.apply_to_bboxes(
        np.array([[0.0, 0.0, 0.2, 0.2, 1], [0.4, 0.4, 0.9, 0.9, 2]]),
        crop_coords=(50, 25, 200, 100),
        shape=(100, 200),
    )
    assert kept[:, 4].tolist() == [2]
    np.testing.assert_allclose(
        kept[0, :4], [(80 - 50) / 150, (40 - 25) / 75, (180 - 50) / 150, (90 - 25) / 75], atol=1e-6
    )


def test_zoom_out_fills_with_the_mean() -> None:
    zoom = ZoomOut(max_scale=3.0, p=1.0)
    image = np.full((40, 60, 3), 255, dtype=np.uint8)
    zoom.set_random_seed(3)
    params = zoom.get_params_dependent_on_data({"shape": image.shape}, {})
    out = zoom.apply(image, **params)
    top, left = params["top"], params["left"]
    assert out.shape[0] >= 40 and out.shape[1] >= 60
    assert (out[top : top + 40, left : left + 60] == 255).all()
    fill = np.array([round(255 * m) for m in IMAGENET_MEAN])
    assert (out.reshape(-1, 3) == fill).all(axis=1).sum() == out.shape[0] * out.shape[1] - 40 * 60


def test_eval_transform_only_resizes() -> None:
    image, boxes = _picture()
    out = detection_eval_transform(64)(image=image, bboxes=boxes, labels=[1, 2], is_crowd=[0, 0])
    np.testing.assert_allclose(out["bboxes"], boxes * np.array([64 / 200, 64 / 120] * 2), atol=1e-4)


def test_workers_draw_different_augmentations(synthetic_coco: Path) -> None:
    coco = load_coco_annotations(synthetic_coco / "annotations" / "instances_train2017.json")
    dm = datamodule(synthetic_coco)

    def dataset() -> COCODetection:
        return COCODetection(
            synthetic_coco / "train2017",
            coco,
            detection_train_transform(64),
            category_id_to_label=dm.category_id_to_label,
            keep_empty_images=False,
        )

    same_image = Subset(dataset(), [0, 0, 0, 0])
    loader = DataLoader(same_image, batch_size=1, num_workers=2, collate_fn=collate_detection)
    images = [batch["images"] for batch in loader]
    # Workers fork one albumentations RNG state; each must re-seed or they repeat each other.
    assert not all(torch.equal(images[0], other) for other in images[1:])
    # In one process, torch's seed makes the augmentation reproducible.
    torch.manual_seed(7)
    first = dataset()[0]["image"]
    torch.manual_seed(7)
    assert torch.equal(dataset()[0]["image"], first)
