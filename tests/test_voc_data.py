"""tasks/data/voc.py and segmentation_transforms.py: reading VOC labels, augmentation, batches."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.data.constants import VOC_CLASSES, VOC_PALETTE
from tasks.data.contract import DatasetInfo
from tasks.data.detection_transforms import MEAN_PIXEL
from tasks.data.files import read_label_png
from tasks.data.segmentation_transforms import eval_transforms, pad_collate, scale_choices, train_transforms
from tasks.data.synthetic import VOC_SHAPE_CLASSES
from tasks.data.voc import VOCSegmentation, VOCSegmentationDataModule


def test_palette_masks_are_read_as_class_indices(synthetic_voc: Path) -> None:
    dataset = VOCSegmentation(synthetic_voc, "train")
    listed = (synthetic_voc / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt").read_text().split()
    assert dataset.ids == listed and len(VOC_CLASSES) == 21
    path = dataset.mask_dir / f"{dataset.ids[0]}.png"
    with Image.open(path) as image:
        assert image.mode == "P"
        as_rgb = np.array(image.convert("RGB"))
    labels = read_label_png(path)
    assert labels.dtype == np.uint8 and labels.ndim == 2
    allowed = {0, 255, *VOC_SHAPE_CLASSES.values()}
    seen: set[int] = set()
    for index in range(len(dataset)):
        mask = dataset[index]["mask"]
        assert mask.dtype == torch.int64
        seen |= set(mask.unique().tolist())
    assert seen <= allowed and len(seen & set(VOC_SHAPE_CLASSES.values())) >= 3
    # Each index is the palette entry of its colour, i.e. what the RGB picture shows.
    palette = np.array(VOC_PALETTE).reshape(256, 3)
    assert np.array_equal(palette[labels], as_rgb)


@pytest.mark.parametrize("mode", ["RGB", "I;16", "RGBA"])
def test_label_maps_in_other_modes_are_refused_with_the_path(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "bad.png"
    Image.new(mode, (4, 4), (128, 0, 0) if mode != "I;16" else 3).save(path)
    with pytest.raises(ValueError, match=rf"bad.png: mode {mode}, expected a label map of class indices \(P: palette indices, or L: 8-bit grey\)$"):
        read_label_png(path)


def test_one_label_reader_for_training_and_scoring(tmp_path: Path) -> None:
    """The mIoU tool reads label PNGs as the DataModule does: the same modes, the same values."""
    from tasks.evaluation.label_files import evaluate_folders

    labels = np.array([[0, 1, 255], [20, 3, 0]], dtype=np.uint8)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    palette = Image.fromarray(labels, mode="L").convert("P")
    palette.putpalette(VOC_PALETTE)
    palette.save(gt_dir / "a.png")
    Image.fromarray(labels, mode="L").save(gt_dir / "b.png")
    assert np.array_equal(read_label_png(gt_dir / "a.png"), read_label_png(gt_dir / "b.png"))
    predicted = np.where(labels == 255, 0, labels).astype(np.uint8)  # a prediction has no void
    for stem in ("a", "b"):
        Image.fromarray(predicted, mode="L").save(pred_dir / f"{stem}.png")
    assert float(evaluate_folders(gt_dir, pred_dir, 21).compute()["pixel_acc"]) == 1.0
    Image.fromarray(predicted.astype(np.uint16)).save(pred_dir / "a.png")  # 16-bit grey (I;16)
    with pytest.raises(ValueError, match=r"a.png: mode I;16, expected a label map"):
        evaluate_folders(gt_dir, pred_dir, 21)


def test_missing_split_and_root_errors(synthetic_voc: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train_aug.txt: split not found; available: \['train', 'trainval', 'val'\]"):
        VOCSegmentation(synthetic_voc, "train_aug")
    with pytest.raises(FileNotFoundError, match="no PASCAL VOC 2012 found"):
        VOCSegmentation(tmp_path, "train")


def make_sbd_copy(synthetic_voc: Path, root: Path) -> Path:
    """A copy with SBD's layout added: grey 'L' SegmentationClassAug masks and train_aug.txt."""
    shutil.copytree(synthetic_voc, root)
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "SegmentationClassAug").mkdir()
    ids = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:5]
    for image_id in ids:
        mask = read_label_png(voc / "SegmentationClass" / f"{image_id}.png")
        Image.fromarray(mask, mode="L").save(voc / "SegmentationClassAug" / f"{image_id}.png")
    # The "image path, label path" form some releases of train_aug.txt use.
    lines = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in ids]
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(lines) + "\n")
    return root


def test_train_aug_split_is_used_when_installed(synthetic_voc: Path, tmp_path: Path) -> None:
    plain = VOCSegmentationDataModule(str(synthetic_voc), crop_size=33, num_workers=0)
    assert plain.resolve_train_split() == "train"
    root = make_sbd_copy(synthetic_voc, tmp_path / "sbd")
    module = VOCSegmentationDataModule(str(root), crop_size=33, num_workers=0)
    assert module.resolve_train_split() == "train_aug"
    module.setup("fit")
    assert len(module.train_dataset) == 5 and module.train_dataset.mask_dir.name == "SegmentationClassAug"
    original = VOCSegmentation(root, "train")
    aug = VOCSegmentation(root, "train_aug")
    assert torch.equal(aug[0]["mask"], original[0]["mask"])  # 'L' and 'P' files, same indices


def test_scale_grid() -> None:
    assert scale_choices((0.5, 2.0), 0.25) == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    assert scale_choices((0.5, 2.0), None) is None
    assert scale_choices((1.0, 1.0), 0.25) == [1.0]
    with pytest.raises(ValueError, match="scale_range"):
        scale_choices((2.0, 0.5), 0.25)


def test_training_crops_pad_with_ignore_and_keep_masks_aligned() -> None:
    # Left half class 3, right half class 7; the image encodes the class in its red channel.
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[:, :30], mask[:, 30:] = 3, 7
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[..., 0] = mask * 30
    image[..., 1:] = 90
    transform = train_transforms(97, scale_range=(0.5, 2.0), scale_step=0.25)
    transform.set_random_seed(0)
    padded_seen = False
    for _ in range(12):
        out = transform(image=image, mask=mask)
        tensor, labels = out["image"], torch.as_tensor(out["mask"]).long()
        assert tuple(tensor.shape) == (3, 97, 97) and tuple(labels.shape) == (97, 97)
        assert tensor.dtype == torch.uint8  # not normalised: the network does it
        values = set(labels.unique().tolist())
        assert values <= {3, 7, 255}  # nearest neighbour: no blended labels
        red = tensor[0].numpy()
        pad = labels == 255
        if pad.any():
            padded_seen = True
            # Padding is ImageNet's mean pixel (about zero once the network normalises it).
            assert (tensor[:, pad] == torch.tensor(MEAN_PIXEL, dtype=torch.uint8)[:, None]).all()
        # Away from the class edge, the image content agrees with the label.
        for label in (3, 7):
            inside = (labels == label).numpy()
            assert np.median(red[inside]) == pytest.approx(label * 30, abs=2)
    assert padded_seen  # scales below 97/60 leave borders to pad


def test_eval_keeps_full_resolution_and_collate_pads(synthetic_voc: Path) -> None:
    dataset = VOCSegmentation(synthetic_voc, "val", transform=eval_transforms())
    raw = VOCSegmentation(synthetic_voc, "val")
    samples = [dataset[0], dataset[1]]
    for index, sample in enumerate(samples):
        assert sample["image"].shape[-2:] == raw[index]["mask"].shape
        assert torch.equal(sample["mask"], raw[index]["mask"])  # no distortion
        assert sample["image"].dtype == torch.uint8 and torch.equal(sample["image"], raw[index]["image"])
    batch = pad_collate(samples)
    height = max(s["image"].shape[1] for s in samples)
    width = max(s["image"].shape[2] for s in samples)
    assert tuple(batch["images"].shape) == (2, 3, height, width)
    assert batch["masks"].dtype == torch.int64 and batch["images"].dtype == torch.uint8
    assert batch["image_sizes"].dtype == torch.int64 and batch["image_sizes"].shape == (2, 2)
    assert (height, width) != tuple(samples[0]["mask"].shape) or (height, width) != tuple(samples[1]["mask"].shape)
    mean = torch.tensor(MEAN_PIXEL, dtype=torch.uint8)[:, None]
    for index, (h, w) in enumerate(batch["image_sizes"].tolist()):
        assert (h, w) == tuple(samples[index]["mask"].shape)
        assert torch.equal(batch["images"][index, :, :h, :w], samples[index]["image"])
        assert torch.equal(batch["masks"][index, :h, :w], samples[index]["mask"])
        assert (batch["masks"][index, h:] == 255).all() and (batch["masks"][index, :, w:] == 255).all()
        padding = torch.ones(height, width, dtype=torch.bool)
        padding[:h, :w] = False
        assert (batch["images"][index][:, padding] == mean).all()  # ImageNet's mean pixel
    assert batch["image_ids"] == [dataset.ids[0], dataset.ids[1]]


def test_datamodule_batches(synthetic_voc: Path) -> None:
    torch.manual_seed(0)
    module = VOCSegmentationDataModule(
        str(synthetic_voc), crop_size=65, batch_size=3, eval_batch_size=2, num_workers=0, val_limit=4
    )
    module.setup("fit")
    train = next(iter(module.train_dataloader()))
    assert set(train) == {"images", "masks", "image_sizes", "image_ids"}
    assert tuple(train["images"].shape) == (3, 3, 65, 65) and tuple(train["masks"].shape) == (3, 65, 65)
    assert train["images"].dtype == torch.uint8 and train["masks"].dtype == torch.int64
    assert train["image_sizes"].tolist() == [[65, 65]] * 3
    assert len(module.train_dataloader()) == len(module.train_dataset) // 3  # full batches only
    val_batches = list(module.val_dataloader())
    assert len(val_batches) == 2 and len(val_batches[0]["image_sizes"]) == 2
    # The augmentation stream follows torch's seed (so seed_everything makes it reproducible).
    draws = []
    for _ in range(2):
        torch.manual_seed(5)
        fresh = VOCSegmentationDataModule(str(synthetic_voc), crop_size=65, num_workers=0)
        fresh.setup("fit")
        draws.append([fresh.train_dataset[0]["image"], fresh.train_dataset[0]["image"]])
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert not torch.equal(draws[0][0], draws[0][1])  # a new crop each time the image is drawn


@pytest.mark.parametrize("worker_init", [True, False], ids=["seed_worker", "no-worker-init"])
def test_each_worker_draws_its_own_augmentations(synthetic_voc: Path, worker_init: bool) -> None:
    from torch.utils.data import DataLoader

    from tasks.data.sampling import seed_worker

    dataset = VOCSegmentation(synthetic_voc, "train", transform=train_transforms(49))
    dataset.ids = dataset.ids[:1] * 4  # one image: only the augmentation can differ
    loader = DataLoader(dataset, batch_size=1, num_workers=2, worker_init_fn=seed_worker if worker_init else None)
    first, second = (batch["image"] for batch, _ in zip(loader, range(2)))  # one from each worker
    assert not torch.equal(first, second)


def test_evaluation_under_two_ranks_scores_each_image_once(synthetic_voc: Path) -> None:
    module = VOCSegmentationDataModule(str(synthetic_voc), eval_batch_size=2, num_workers=0, val_limit=7)
    module.setup("validate")
    stems: list[str] = []
    for rank in range(2):
        module.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # a faked 2-process world
        share = [stem for batch in module.val_dataloader() for stem in batch["image_ids"]]
        assert len(share) == (4, 3)[rank]
        stems += share
    assert sorted(stems) == module.val_dataset.ids


def test_class_names_come_from_the_data(synthetic_voc: Path) -> None:
    def info(**options) -> DatasetInfo:
        module = VOCSegmentationDataModule(str(synthetic_voc), num_workers=0, **options)
        module.setup("validate")
        return module.dataset_info()

    voc = info()
    assert isinstance(voc, DatasetInfo) and voc.num_classes == 21 and voc.image_size is None
    assert voc.class_names == dict(enumerate(VOC_CLASSES)) and voc.label_to_category_id is None
    assert voc.coco_ground_truth == {}
    synthetic = info(synthetic=True)  # the generator's names, in VOC's label space
    assert synthetic.num_classes == 21 and len(synthetic.class_names) == 21
    assert {synthetic.class_names[label] for label in VOC_SHAPE_CLASSES.values()} == set(VOC_SHAPE_CLASSES)
    assert all(synthetic.class_names[label] == shape for shape, label in VOC_SHAPE_CLASSES.items())
    assert synthetic.class_names[0] == "background" and synthetic.class_names[2] == "class_2"
    names = ["background", *(f"thing{i}" for i in range(1, 21))]
    own = info(class_names=names)  # a user's list for their own data
    assert own.num_classes == 21 and own.class_names == dict(enumerate(names))
    assert VOCSegmentationDataModule(str(synthetic_voc), class_names=["bg", "road", "car"]).num_classes == 3
    with pytest.raises(ValueError, match=r"data.class_names lists 3 names but data.num_classes is 21"):
        VOCSegmentationDataModule(str(synthetic_voc), class_names=["bg", "road", "car"], num_classes=21)


def test_synthetic_data_is_written_only_when_missing_and_allowed(
    synthetic_voc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.data.synthetic

    calls: list[Path] = []
    monkeypatch.setattr(tasks.data.synthetic, "make_voc", lambda root: calls.append(Path(root)))
    monkeypatch.chdir(tmp_path)  # the default root data/synthetic/voc is relative to the working directory
    VOCSegmentationDataModule("data/synthetic/voc", synthetic=True).prepare_data()  # the config's default
    typo = VOCSegmentationDataModule(str(tmp_path / "new"), synthetic=True)
    typo.prepare_data()  # a mistyped root: not written ...
    VOCSegmentationDataModule(str(tmp_path / "new"), synthetic=True, write_synthetic=True).prepare_data()
    VOCSegmentationDataModule(str(synthetic_voc), synthetic=True, write_synthetic=True).prepare_data()  # there
    VOCSegmentationDataModule(str(tmp_path / "other")).prepare_data()
    assert calls == [Path("data/synthetic/voc"), tmp_path / "new"]
    with pytest.raises(FileNotFoundError, match=r"new: no PASCAL VOC 2012 found .*; data.synthetic writes the synthetic set only at data/synthetic/voc; add --data.write_synthetic true"):
        typo.setup("fit")  # ... but "not found", saying how to write it there
    with pytest.raises(FileNotFoundError, match=r"other: no PASCAL VOC 2012 found \(expected [^;]*\)$"):
        VOCSegmentationDataModule(str(tmp_path / "other")).setup("validate")


# ------------------------------------------------------------------------- the real datasets' quirks
def test_realistic_train_split_is_sbd_train_aug(realistic_voc: Path) -> None:
    module = VOCSegmentationDataModule(str(realistic_voc), crop_size=33, batch_size=4, num_workers=0)
    assert module.resolve_train_split() == "train_aug"
    module.setup("fit")
    listed = (realistic_voc / "VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt").read_text().splitlines()
    assert module.train_dataset.ids == [Path(line.split()[0]).stem for line in listed]
    assert module.train_dataset.mask_dir.name == "SegmentationClassAug"
    assert module.val_dataset.mask_dir.name == "SegmentationClass" and module.val_dataset.split == "val"
    allowed = {0, 255, *VOC_SHAPE_CLASSES.values()}
    for index in range(len(module.train_dataset)):  # 'L' masks, SBD-only ones included, all readable
        sample = module.train_dataset[index]
        assert sample["image"].shape == (3, 33, 33) and set(sample["mask"].unique().tolist()) <= allowed


def test_realistic_void_stays_ignore(realistic_voc: Path) -> None:
    module = VOCSegmentationDataModule(str(realistic_voc), crop_size=65, batch_size=2, num_workers=0)
    module.setup("validate")
    assert module.ignore_index == 255
    voc = realistic_voc / "VOCdevkit/VOC2012"
    for batch in module.val_dataloader():
        (image_id,), (height, width) = batch["image_ids"], batch["image_sizes"][0].tolist()
        with Image.open(voc / "SegmentationClass" / f"{image_id}.png") as mask:
            assert mask.mode == "P"
            expected = np.asarray(mask)
        labels = batch["masks"][0, :height, :width].numpy()
        assert np.array_equal(labels, expected) and (labels == 255).any()  # void borders, as they are
        assert batch["images"].shape[1] == 3


def test_options_saved_before_the_rename_are_upgraded() -> None:
    from backbones import IMAGENET_MEAN, IMAGENET_STD
    from tasks.checkpoint_conversion import upgrade_voc_options

    old = {"root": "data/VOC", "val_batch_size": 4, "hflip": False, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert upgrade_voc_options(old) == {"root": "data/VOC", "eval_batch_size": 4, "hflip_p": 0.0}
    assert upgrade_voc_options({"hflip": True})["hflip_p"] == 0.5
    VOCSegmentationDataModule(**upgrade_voc_options(old))  # today's DataModule takes them
    with pytest.raises(ValueError, match=r"data.mean \[0.5, 0.5, 0.5\] is no longer an option: the network normalises"):
        upgrade_voc_options({"mean": [0.5, 0.5, 0.5]})
