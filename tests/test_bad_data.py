"""Bad input: each broken file either works correctly or stops the run with its path and the problem.

Every case writes its broken file into a copy of the session's synthetic COCO / VOC data.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.data.coco import COCODetectionDataModule
from tasks.data.files import MissingFileError, UnreadableSampleError, read_rgb
from tasks.data.voc import VOCSegmentation
from tasks.networks import DeepLabV3MobileNetV2
from tasks.segmentation import DeepLabV3Segmentation
from tasks.checkpoints import check_compatible
from tools.train import main

ROOT = Path(__file__).resolve().parents[1]
SEG_CONFIG = str(ROOT / "configs" / "deeplabv3_mobilenetv2_synthetic.yaml")
DET_CONFIG = str(ROOT / "configs" / "ssdlite_mobilenetv2_synthetic.yaml")


@pytest.fixture(autouse=True)
def _command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["tools/train.py"])  # LightningCLI compares with sys.argv


@pytest.fixture
def coco(synthetic_coco: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synthetic_coco, tmp_path / "coco"))


@pytest.fixture
def voc(synthetic_voc: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synthetic_voc, tmp_path / "voc"))


def coco_module(root: Path, **kwargs) -> COCODetectionDataModule:
    return COCODetectionDataModule(root, **{"image_size": 64, "batch_size": 4, "num_workers": 0, **kwargs})


def gt(root: Path, split: str = "train2017") -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def write_gt(root: Path, data: dict, split: str = "train2017") -> None:
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def first_train_image(root: Path) -> Path:
    dm = coco_module(root)
    dm.setup("fit")
    return root / "train2017" / dm.datasets["train"].records[0]["file_name"]


# ---------------------------------------------------------------------------------- images
@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_grey_cmyk_rgba_palette_and_16_bit_images_become_rgb(coco: Path, mode: str) -> None:
    path = first_train_image(coco)
    original = np.asarray(Image.open(path).convert("RGB"))
    if mode == "I;16":
        grey = np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 257
        Image.fromarray(grey).save(path, format="PNG")  # a 16-bit PNG behind a .jpg name
        expected = np.repeat((grey // 257).astype(np.uint8)[:, :, None], 3, axis=2)
    else:
        converted = Image.fromarray(original).convert(mode)
        converted.save(path, format="JPEG" if mode in ("L", "CMYK") else "PNG")
        # Grey and palette images keep their grey levels / palette colours (compared with PIL's
        # own conversion); CMYK and RGBA come back as the original RGB.
        expected = np.asarray(Image.open(path).convert("RGB")) if mode in ("L", "P") else original
    image = read_rgb(path)
    assert image.dtype == np.uint8 and image.shape == (*original.shape[:2], 3)
    tolerance = 6.0 if mode == "CMYK" else 0.0  # CMYK: re-encoded as a JPEG
    assert np.abs(image.astype(float) - expected.astype(float)).mean() <= tolerance
    dm = coco_module(coco)
    dm.setup("fit")
    assert dm.datasets["train"][0]["image"].shape == (3, 64, 64)  # and training reads it


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: b"this is not a JPEG" + data[:100], "not a readable image"),
        (lambda data: data[: len(data) // 2], "corrupt or truncated image"),
    ],
    ids=["corrupt", "truncated"],
)
def test_corrupt_and_truncated_images_name_the_file(coco: Path, damage, message: str) -> None:
    path = first_train_image(coco)
    path.write_bytes(damage(path.read_bytes()))
    dm = coco_module(coco, batch_size=1)  # no partial batch dropped: every image is read
    dm.setup("fit")
    with pytest.raises(UnreadableSampleError, match=rf"{path.name}: {message}"):
        dm.datasets["train"][0]
    with pytest.raises(UnreadableSampleError, match=path.name):  # through the training loader as well
        for _ in dm.train_dataloader():
            pass


def test_skip_unreadable_replaces_and_counts_per_epoch(coco: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = first_train_image(coco)
    path.write_bytes(b"garbage")
    dm = coco_module(coco, skip_unreadable=True, batch_size=1)  # every image is read each epoch
    dm.setup("fit")
    records = dm.datasets["train"].records
    bad_id = next(r["image_id"] for r in records if r["file_name"] == path.name)
    for epoch in range(2):
        dm.train_dataloader().sampler.set_epoch(epoch)
        with caplog.at_level(logging.WARNING, logger="tasks.data.sampling"):
            batches = [dm.on_before_batch_transfer(batch, 0) for batch in dm.train_dataloader()]
        ids = [int(b["image_ids"][0]) for b in batches]
        assert len(ids) == len(records) and bad_id not in ids  # replaced: the batch stays full
        assert len(set(ids)) == len(records) - 1  # by the next readable image
        assert all("skipped_samples" not in b for b in batches)  # the DataModule took the messages
        assert dm.skipped.reset() == 1, epoch
    assert f"{path.name}: not a readable image" in caplog.text and "skipped" in caplog.text
    # Evaluation never skips: its numbers must cover the whole split.
    val = coco / "val2017" / gt(coco, "val2017")["images"][0]["file_name"]
    val.write_bytes(b"garbage")
    dm.setup("validate")
    with pytest.raises(UnreadableSampleError, match=val.name):
        next(iter(dm.val_dataloader()))


def test_missing_images_fail_at_setup_or_are_left_out(coco: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = first_train_image(coco)
    path.unlink()
    with pytest.raises(MissingFileError, match=rf"train2017: 1 of \d+ files listed in .*instances_train2017.json are missing \({path.name}\)"):
        coco_module(coco).setup("fit")
    dm = coco_module(coco, skip_unreadable=True)
    with caplog.at_level(logging.WARNING, logger="tasks.data.coco"):
        dm.setup("fit")
    assert "left out" in caplog.text
    assert path.name not in {r["file_name"] for r in dm.datasets["train"].records}


def test_image_size_must_match_its_annotation(coco: Path) -> None:
    path = first_train_image(coco)
    Image.open(path).convert("RGB").resize((50, 40)).save(path, format="JPEG")
    dm = coco_module(coco)
    dm.setup("fit")
    with pytest.raises(UnreadableSampleError, match=rf"{path.name}: image is 50x40, annotations say \d+x\d+"):
        dm.datasets["train"][0]


# ---------------------------------------------------------------------------------- annotations
def test_negative_zero_and_outside_boxes_are_dropped_or_clipped(coco: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = gt(coco)
    image = data["images"][0]
    width, height = image["width"], image["height"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != image["id"]]
    boxes = [
        [10, 10, -5, 20],  # negative width: dropped
        [10, 10, 20, 0],  # zero height: dropped
        [width + 5, 3, 10, 10],  # entirely outside: nothing left after clipping, dropped
        [-10, -20, 40, 60],  # partly outside: clipped to [0, 0, 30, 40]
        [width - 10, height - 10, 50, 50],  # clipped to the bottom-right corner
    ]
    for offset, bbox in enumerate(boxes):
        data["annotations"].append(
            {"id": 10_000 + offset, "image_id": image["id"], "category_id": 3, "bbox": bbox, "area": 1.0, "iscrowd": 0}
        )
    write_gt(coco, data)
    dm = coco_module(coco, keep_empty_images=True)
    with caplog.at_level(logging.WARNING, logger="tasks.data.coco"):
        dm.setup("fit")
    assert "dropped 3 degenerate boxes" in caplog.text
    record = next(r for r in dm.datasets["train"].records if r["image_id"] == image["id"])
    np.testing.assert_allclose(record["boxes"], [[0, 0, 30, 40], [width - 10, height - 10, width, height]])
    sample = dm.datasets["train"][dm.datasets["train"].records.index(record)]
    assert ((sample["boxes"] >= 0) & (sample["boxes"] <= 64)).all()


def test_unknown_category_id_names_the_annotation(coco: Path) -> None:
    data = gt(coco)
    data["annotations"][0]["category_id"] = 99
    write_gt(coco, data)
    annotation = data["annotations"][0]["id"]
    with pytest.raises(ValueError, match=rf"instances_train2017.json: annotation {annotation} of image .* has category id 99, not one of the categories \[1, 3, 7, 12, 44\]"):
        coco_module(coco).setup("fit")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "not a COCO instances file"),
        ("{}", "no images"),
        (None, "no categories"),
    ],
    ids=["empty-file", "empty-json", "no-categories"],
)
def test_empty_annotation_files(coco: Path, content: str | None, message: str) -> None:
    path = coco / "annotations" / "instances_val2017.json"
    if content is None:
        data = gt(coco, "val2017")
        data["categories"] = []
        content = json.dumps(data)
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"instances_val2017.json: {message}"):
        coco_module(coco).setup("validate")


def test_no_training_images_with_objects(coco: Path) -> None:
    data = gt(coco)
    data["annotations"] = [{**a, "iscrowd": 1} for a in data["annotations"]]  # crowd regions only
    write_gt(coco, data)
    with pytest.raises(ValueError, match=r"instances_train2017.json: no usable images in train2017 with objects"):
        coco_module(coco).setup("fit")


@pytest.mark.parametrize(("split", "stage"), [("train2017", "fit"), ("val2017", "validate")])
def test_annotation_file_without_annotations_key_is_refused(coco: Path, split: str, stage: str) -> None:
    # pycocotools reads such a file (an image_info file, say) as "no objects": training would see
    # pure background (keep_empty_images) and COCOeval would give AP = -1, silently.
    data = gt(coco, split)
    del data["annotations"]
    write_gt(coco, data, split)
    with pytest.raises(ValueError, match=rf"instances_{split}.json: no 'annotations' key"):
        coco_module(coco, keep_empty_images=True).setup(stage)


def test_empty_annotations_list_stops_training_and_warns_for_validation(
    coco: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for split in ("train2017", "val2017"):
        data = gt(coco, split)
        data["annotations"] = []
        write_gt(coco, data, split)
    with pytest.raises(ValueError, match=r"instances_train2017.json: 'annotations' is empty; training would see background only"):
        coco_module(coco, keep_empty_images=True).setup("fit")
    dm = coco_module(coco)
    with caplog.at_level(logging.WARNING, logger="tasks.data.coco"):
        dm.setup("validate")  # a split without objects can still be predicted on
    assert "instances_val2017.json: 'annotations' is empty: every detection on val2017 counts as a false positive" in caplog.text
    assert len(dm.datasets["val"]) == len(gt(coco, "val2017")["images"])


@pytest.mark.parametrize("config", [DET_CONFIG, SEG_CONFIG], ids=["coco", "voc"])
def test_mistyped_root_of_a_synthetic_config_is_not_filled_with_new_data(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    typo = tmp_path / "data" / "synthetc"
    try:
        main(["fit", "--config", config, "--data.root", str(typo), "--trainer.fast_dev_run", "1",
              "--trainer.default_root_dir", str(tmp_path / "runs"),
              "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])  # fmt: skip
    except (FileNotFoundError, SystemExit) as error:  # raised, or printed as one line by the CLI
        message = f"{error}\n{capsys.readouterr().err}"
    else:
        pytest.fail("training started on a root that does not exist")
    assert f"{typo}: COCO root directory not found" in message or f"{typo}: no PASCAL VOC 2012 found" in message
    assert "--data.write_synthetic true" in message
    assert not typo.exists()


def test_wrong_folder_layouts_say_what_is_expected(coco: Path, voc: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train2017/annotations/instances_train2017.json: COCO annotation file not found \(expected root/annotations"):
        coco_module(coco / "train2017").setup("fit")
    with pytest.raises(FileNotFoundError, match=r"no PASCAL VOC 2012 found \(expected .*VOCdevkit/VOC2012/JPEGImages\)"):
        VOCSegmentation(voc / "VOCdevkit" / "VOC2012" / "SegmentationClass", "train")
    shutil.rmtree(voc / "VOCdevkit" / "VOC2012" / "SegmentationClass")
    with pytest.raises(FileNotFoundError, match=r"SegmentationClass: label folder of split 'train' not found"):
        VOCSegmentation(voc, "train")


# ---------------------------------------------------------------------------------- VOC masks
def voc_paths(root: Path, split: str = "train") -> tuple[Path, Path, str]:
    dataset = VOCSegmentation(root, split)
    image_id = dataset.ids[0]
    return dataset.voc / "JPEGImages" / f"{image_id}.jpg", dataset.voc / "SegmentationClass" / f"{image_id}.png", image_id


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda mask: Image.fromarray(mask).convert("RGB"), r"mode RGB, expected a label map of class indices \(P"),
        (lambda mask: Image.fromarray(mask[:-3], mode="L"), r"mask is \d+x\d+, its image \d+x\d+"),
        (lambda mask: Image.fromarray(np.full_like(mask, 40), mode="L"), r"labels \[40\] outside 0..20"),
        (lambda mask: b"not a png", "not a readable PNG"),
    ],
    ids=["rgb-mode", "wrong-size", "label-out-of-range", "corrupt"],
)
def test_bad_masks_name_the_file_or_are_skipped(voc: Path, damage, message: str) -> None:
    _, mask_path, _ = voc_paths(voc)
    broken = damage(np.asarray(Image.open(mask_path)))
    if isinstance(broken, bytes):
        mask_path.write_bytes(broken)
    else:
        broken.save(mask_path)
    with pytest.raises(UnreadableSampleError, match=rf"{mask_path.name}: {message}"):
        VOCSegmentation(voc, "train", num_classes=21)[0]
    skipping = VOCSegmentation(voc, "train", num_classes=21, skip_unreadable=True)
    sample = skipping[0]
    assert sample["image_id"] == skipping.ids[1] and len(sample["skipped_samples"]) == 1


def test_grey_voc_image_and_missing_files(voc: Path) -> None:
    image_path, mask_path, image_id = voc_paths(voc)
    Image.open(image_path).convert("L").save(image_path)
    sample = VOCSegmentation(voc, "train")[0]
    assert sample["image"].shape[0] == 3 and sample["image"].shape[1:] == sample["mask"].shape
    mask_path.unlink()
    with pytest.raises(MissingFileError, match=rf"SegmentationClass: 1 of \d+ files listed in .*train.txt are missing \({image_id}.png\)"):
        VOCSegmentation(voc, "train")
    assert image_id not in VOCSegmentation(voc, "train", skip_unreadable=True).ids


# ---------------------------------------------------------------------------------- configs
SEG_SMALL = ["--data.crop_size", "33", "--data.batch_size", "4", "--data.num_workers", "0", "--model.network.width_mult", "0.35"]


def test_skipped_samples_are_reported_at_the_end_of_each_epoch(voc: Path, tmp_path: Path) -> None:
    image_path, _, _ = voc_paths(voc)
    image_path.write_bytes(image_path.read_bytes()[:300])  # truncated
    cli = main(
        ["fit", "--config", SEG_CONFIG, "--data.root", str(voc), *SEG_SMALL, "--data.skip_unreadable", "true",
         "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    )  # fmt: skip
    rows = list(csv.DictReader((Path(cli.trainer.log_dir) / "metrics.csv").open()))
    assert [float(r["train/skipped_samples"]) for r in rows if r.get("train/skipped_samples")] == [1.0, 1.0]


def run_cli_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit):
        main(args)
    return capsys.readouterr().err


def test_unknown_keys_and_wrong_types_are_named(voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["fit", "--config", SEG_CONFIG, "--data.root", str(voc), "--trainer.fast_dev_run", "1"]
    error = run_cli_error([*base, "--model.network.num_clases", "6"], capsys)
    assert "Option 'num_clases' is not accepted" in error  # a network option (it takes head options too)
    error = run_cli_error([*base, "--data.batch_size", "many"], capsys)
    assert "batch_size" in error and "many" in error
    config = Path(SEG_CONFIG).read_text().replace("    crop_size: 129\n", "    crop_size: 129\n    crop_sise: 65\n")
    (tmp_path / "typo.yaml").write_text(config)
    error = run_cli_error(["fit", "--config", str(tmp_path / "typo.yaml"), "--data.root", str(voc)], capsys)
    assert "crop_sise" in error


def test_class_count_must_cover_the_data(voc: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"labels up to 20 but the network has num_classes=6 .*--model.network.num_classes 21"):
        main(["fit", "--config", SEG_CONFIG, "--data.root", str(voc), *SEG_SMALL, "--model.network.num_classes", "6",
              "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip


def test_checkpoints_of_the_other_task_or_shape_are_refused(
    voc: Path, detection_checkpoint: Path, segmentation_checkpoint: Path, tmp_path: Path
) -> None:
    base = ["fit", "--config", SEG_CONFIG, "--data.root", str(voc), "--data.num_workers", "0",
            "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    with pytest.raises(ValueError, match="checkpoint of a SSDLiteDetection, but the config trains a DeepLabV3Segmentation"):
        main([*base, "--model.network.width_mult", "0.35", "--ckpt_path", str(detection_checkpoint)])
    # Through the CLI the checkpoint's hyper-parameters win (LightningCLI); a model built
    # otherwise is checked shape by shape, naming the options that differ.
    cli = main([*base, "--ckpt_path", str(segmentation_checkpoint)])
    assert cli.model.hparams.network["init_args"]["width_mult"] == 0.35
    with pytest.raises(ValueError, match=r"parameter shapes differ .*model.network.width_mult: checkpoint 0.35, config 1.0"):
        check_compatible(segmentation_checkpoint, DeepLabV3Segmentation(DeepLabV3MobileNetV2(width_mult=1.0)))
    with pytest.raises(ValueError, match="checkpoint of a DeepLabV3Segmentation, but the config trains a SSDLiteDetection"):
        main(["validate", "--config", DET_CONFIG, "--data.root", str(tmp_path / "unused"), "--data.synthetic", "false",
              "--ckpt_path", str(segmentation_checkpoint)])  # fmt: skip
