"""tasks/data/coco.py and detection_transforms.py: label maps, batches, boxes that follow the image."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

import tasks.data.synthetic
from backbones import IMAGENET_MEAN
from tasks.data.coco import COCODetection, COCODetectionDataModule, collate_detection, load_coco_annotations
from tasks.data.contract import DatasetInfo
from tasks.data.synthetic import COCO_2017_CATEGORIES, REALISTIC_COCO_CATEGORY_IDS
from tasks.data.detection_transforms import (
    MEAN_PIXEL,
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


def test_dataset_info_describes_labels_size_and_the_ground_truth_set_up(synthetic_coco: Path) -> None:
    dm = datamodule(synthetic_coco, contiguous_labels=False)
    dm.setup("validate")
    info = dm.dataset_info()
    assert isinstance(info, DatasetInfo)
    assert info.num_classes == 45 and info.image_size == SIZE
    assert info.label_to_category_id == {1: 1, 3: 3, 7: 7, 12: 12, 44: 44}
    assert info.class_names == {1: "circle", 3: "square", 7: "triangle", 12: "cross", 44: "ring"}
    assert set(info.coco_ground_truth) == {"val"}  # only the split set up
    assert info.coco_ground_truth["val"].getImgIds() == dm.annotations("val").getImgIds()
    assert len(info.coco_ground_truth["val"].getImgIds()) == len(annotations(synthetic_coco)["images"])
    dm.setup("test")
    assert set(dm.dataset_info().coco_ground_truth) == {"val", "test"}


def test_validation_batches_resize_only_and_keep_every_image(synthetic_coco: Path) -> None:
    dm = datamodule(synthetic_coco)
    dm.setup("validate")
    gt = annotations(synthetic_coco)
    assert len(dm.datasets["val"]) == len(gt["images"])  # images without objects included
    images = {image["id"]: image for image in gt["images"]}
    label_of = dm.category_id_to_label
    seen = 0
    for batch in dm.val_dataloader():
        assert set(batch) == {"images", "targets", "image_ids", "image_sizes"}
        n = len(batch["image_ids"])
        assert batch["images"].shape == (n, 3, SIZE, SIZE) and batch["images"].dtype == torch.uint8
        assert isinstance(batch["image_ids"], list) and all(type(i) is int for i in batch["image_ids"])
        assert batch["image_sizes"].dtype == torch.int64 and batch["image_sizes"].shape == (n, 2)
        for image_id, image_size, target in zip(batch["image_ids"], batch["image_sizes"].tolist(), batch["targets"]):
            info = images[image_id]
            assert image_size == [info["height"], info["width"]]
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
    # The pixels reach the task as they are: the network normalises them, not the DataModule.
    transferred = dm.on_after_batch_transfer(batch, 0)["images"]
    assert transferred.dtype == torch.uint8 and torch.equal(transferred, batch["images"])


def test_evaluation_under_two_ranks_scores_each_image_once(synthetic_coco: Path) -> None:
    """Lightning's DistributedSampler would pad the last rank with repeated images."""
    dm = datamodule(synthetic_coco, eval_batch_size=2)
    dm.setup("validate")
    dataset = dm.datasets["val"]
    dataset.records = dataset.records[:7]  # an odd count: a padding sampler would repeat one image
    ids: list[int] = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # a faked 2-process world
        share = [image_id for batch in dm.val_dataloader() for image_id in batch["image_ids"]]
        assert len(share) == (4, 3)[rank]
        ids += share
    assert sorted(ids) == [record["image_id"] for record in dataset.records]


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
    dm = datamodule(tmp_path / "synth", synthetic=True, write_synthetic=True)
    dm.prepare_data()
    dm.prepare_data()  # already there: not rewritten
    assert calls == [tmp_path / "synth"]
    dm.setup("validate")
    assert len(dm.datasets["val"]) == 2


def test_synthetic_set_is_written_only_at_its_default_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(tasks.data.synthetic, "make_coco", lambda root: calls.append(Path(root)))
    monkeypatch.chdir(tmp_path)  # the default root data/synthetic/coco is relative to the working directory
    datamodule("data/synthetic/coco", synthetic=True).prepare_data()
    assert calls == [Path("data/synthetic/coco")]
    typo = datamodule(tmp_path / "data" / "synthetc" / "coco", synthetic=True)
    typo.prepare_data()  # a mistyped root: nothing written ...
    assert calls == [Path("data/synthetic/coco")] and not (tmp_path / "data" / "synthetc").exists()
    with pytest.raises(FileNotFoundError, match=r"synthetc/coco: COCO root directory not found; .*only at data/synthetic/coco; add --data.write_synthetic true"):
        typo.setup("fit")  # ... and a "not found" that says how to write it there
    datamodule(tmp_path / "elsewhere", synthetic=True, write_synthetic=True).prepare_data()  # asked: written
    assert calls[-1] == tmp_path / "elsewhere"
    real = datamodule(tmp_path / "real")  # not a synthetic config: no hint
    with pytest.raises(FileNotFoundError, match=r"real: COCO root directory not found$"):
        real.setup("fit")


def test_synthetic_configs_use_the_default_roots() -> None:
    import yaml

    root = Path(__file__).resolve().parents[1] / "configs"
    for config, default in (
        ("ssdlite_mobilenetv2_synthetic.yaml", tasks.data.synthetic.SYNTHETIC_COCO_ROOT),
        ("deeplabv3_mobilenetv2_synthetic.yaml", tasks.data.synthetic.SYNTHETIC_VOC_ROOT),
    ):
        data = yaml.safe_load((root / config).read_text())["data"]["init_args"]
        assert Path(data["root"]) == default and data["synthetic"] is True and data["write_synthetic"] is False


# ------------------------------------------------------------------------- the real datasets' quirks
def _realistic_gt(root: Path, split: str) -> dict:
    return annotations(root, f"{split}2017")


@pytest.mark.parametrize("contiguous", [True, False], ids=["80-labels", "91-ids"])
def test_realistic_labels_map_to_real_category_ids(realistic_coco: Path, contiguous: bool) -> None:
    dm = datamodule(realistic_coco, contiguous_labels=contiguous)
    ids = [category_id for category_id, _, _ in COCO_2017_CATEGORIES]
    if contiguous:
        assert dm.label_to_category_id == dict(enumerate(ids, start=1)) and dm.num_classes == 81
        assert dm.category_id_to_label[13] == 12 and dm.category_id_to_label[90] == 80
    else:
        assert dm.label_to_category_id == {i: i for i in ids} and dm.num_classes == 91
    assert dm.class_names[dm.category_id_to_label[90]] == "toothbrush"
    dm.setup("validate")
    gt = _realistic_gt(realistic_coco, "val")
    images = {image["id"]: image for image in gt["images"]}
    seen = set()
    for batch in dm.val_dataloader():
        for image_id, target in zip(batch["image_ids"], batch["targets"]):
            info = images[image_id]
            objects = [
                a for a in gt["annotations"]
                if a["image_id"] == image_id and not a["iscrowd"]
                and min(a["bbox"][2] * SIZE / info["width"], a["bbox"][3] * SIZE / info["height"], *a["bbox"][2:]) >= 1
            ]  # fmt: skip
            expected = sorted(a["category_id"] for a in objects)
            assert sorted(dm.label_to_category_id[label] for label in target["labels"].tolist()) == expected
            seen |= set(expected)
    assert seen == set(REALISTIC_COCO_CATEGORY_IDS.values())  # 1, 13, 46, 72 and 90 all came through


def test_realistic_crowd_regions_become_crowd_boxes(realistic_coco: Path) -> None:
    dm = datamodule(realistic_coco, keep_empty_images=True)
    dm.setup("fit")
    for split in ("train", "val"):
        gt = _realistic_gt(realistic_coco, split)
        dataset = dm.datasets[split]
        crowds = [a for a in gt["annotations"] if a["iscrowd"]]
        assert {type(a["segmentation"]["counts"]) for a in crowds} == {list, str}
        for a in crowds:
            index = next(i for i, r in enumerate(dataset.records) if r["image_id"] == a["image_id"])
            record = dataset.records[index]
            x, y, w, h = a["bbox"]
            np.testing.assert_allclose(record["crowd_boxes"], [[x, y, x + w, y + h]])
            objects = [b for b in gt["annotations"] if b["image_id"] == a["image_id"] and not b["iscrowd"]]
            assert len(record["boxes"]) == len(record["labels"]) == len(objects)  # the crowd is no object
            if split == "val":  # resize only: the crowd box reaches the batch, scaled, apart from objects
                sample = dataset[index]
                scale = np.array([SIZE / record["size"][1], SIZE / record["size"][0]] * 2)
                np.testing.assert_allclose(sample["crowd_boxes"].numpy(), [[x, y, x + w, y + h] * scale], atol=1e-3)
                assert len(sample["boxes"]) == len(sample["labels"]) == len(record["boxes"])


def test_realistic_empty_images_are_kept_for_validation_only(realistic_coco: Path) -> None:
    dm = datamodule(realistic_coco)
    dm.setup("fit")
    for split, kept in (("train", False), ("val", True)):
        gt = _realistic_gt(realistic_coco, split)
        empty = {im["id"] for im in gt["images"]} - {a["image_id"] for a in gt["annotations"]}
        ids = {r["image_id"] for r in dm.datasets[split].records}
        assert empty and (empty <= ids) == kept and (not empty & ids) == (not kept)
    assert len(dm.datasets["val"]) == len(_realistic_gt(realistic_coco, "val")["images"])


def test_realistic_images_decode_to_rgb(realistic_coco: Path) -> None:
    dm = datamodule(realistic_coco, keep_empty_images=True)
    dm.setup("fit")
    modes = set()
    for split in ("train", "val"):
        dataset = dm.datasets[split]
        for index, record in enumerate(dataset.records):
            path = dataset.image_dir / record["file_name"]
            with Image.open(path) as image:
                mode = image.mode
                reference = np.asarray(image.convert("RGB"), dtype=np.float64)
            modes.add(mode)
            rgb = dataset.load_image(index)
            assert rgb.dtype == np.uint8 and rgb.shape == (*record["size"], 3), path
            if mode == "L":
                assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
            # CMYK JPEGs: PIL's conversion (Adobe's inverted CMYK); RGBA: alpha dropped.
            assert np.abs(rgb - reference).mean() < 1.0, path
            assert dataset[index]["image"].shape == (3, SIZE, SIZE)
    assert modes == {"RGB", "L", "CMYK", "RGBA"}


def _sample_boxes_equal_records(dataset: COCODetection) -> None:
    """The evaluation transform drops no box: every record's boxes reach its sample."""
    for index, record in enumerate(dataset.records):
        sample = dataset[index]
        assert len(sample["boxes"]) == len(record["boxes"]), record["file_name"]
        assert len(sample["crowd_boxes"]) == len(record["crowd_boxes"]), record["file_name"]


def test_boxes_under_a_pixel_at_the_input_are_dropped_and_counted(
    synthetic_coco: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A box 2 px wide in a >= 160 px image is under 1 px at 64x64: albumentations' min_width used to
    drop it from the sample without a word; now the dataset drops it and counts it."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / split).symlink_to(synthetic_coco / split)
        shutil.copy(synthetic_coco / "annotations" / f"instances_{split}.json", root / "annotations")
    gt = annotations(root)
    image = next(i for i in gt["images"] if i["width"] <= 240)  # at 128x128 the box is >= 1.07 px
    thin = {"id": 10**6, "image_id": image["id"], "category_id": 3, "bbox": [20.0, 20.0, 2.0, 40.0],
            "area": 80.0, "iscrowd": 0, "segmentation": [[20, 20, 22, 20, 22, 60, 20, 60]]}  # fmt: skip
    gt["annotations"].append(thin)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(gt))
    dm = datamodule(root, image_size=64)
    with caplog.at_level(logging.WARNING, logger="tasks.data.coco"):
        dm.setup("validate")
    dataset = dm.datasets["val"]
    assert dataset.num_dropped_boxes == 1
    assert "instances_val2017.json: dropped 1 degenerate boxes of val2017" in caplog.text
    assert "at the 64x64 input" in caplog.text
    _sample_boxes_equal_records(dataset)
    # At 128x128 the same box is 1.6 px wide: kept, and it reaches the sample.
    wide = datamodule(root, image_size=SIZE)
    wide.setup("validate")
    assert wide.datasets["val"].num_dropped_boxes == 0
    _sample_boxes_equal_records(wide.datasets["val"])


def test_realistic_sub_pixel_box_is_counted(realistic_coco: Path, caplog: pytest.LogCaptureFixture) -> None:
    dm = datamodule(realistic_coco)
    with caplog.at_level(logging.WARNING, logger="tasks.data.coco"):
        dm.setup("validate")
    assert dm.datasets["val"].num_dropped_boxes == 1  # the 0.6 px wide object of COCO's kind
    assert "dropped 1 degenerate boxes of val2017" in caplog.text
    _sample_boxes_equal_records(dm.datasets["val"])


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
    assert tuple(fill) == MEAN_PIXEL == (124, 116, 104)
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
