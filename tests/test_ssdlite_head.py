"""heads/ssdlite.py: declared vs real shapes, the separable layers, loss and post-processing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import box_iou

from backbones import FeatureSpec, MobileNetV2
from heads.anchors import encode_boxes
from heads.ssdlite import SSDLiteHead, normalised_targets
from tasks.networks import SSDLiteMobileNetV2
from tasks.networks.detector import COCO_NUM_CLASSES_CATEGORY_IDS, COCO_NUM_CLASSES_CONTIGUOUS

# The loss takes targets in absolute pixels of the network input, as postprocess answers: a
# non-square input, so a swapped height and width would show.
IMAGE = (300, 500)  # (height, width)
TO_PIXELS = torch.tensor([500.0, 300.0, 500.0, 300.0])


@pytest.fixture(scope="module")
def small_model() -> nn.Module:
    torch.manual_seed(0)
    return SSDLiteMobileNetV2(num_classes=6, width_mult=0.35).eval()


@pytest.mark.parametrize(
    ("size", "expected"),
    [(300, [19, 10, 5, 3, 2, 1]), (320, [20, 10, 5, 3, 2, 1]), (321, [21, 11, 6, 3, 2, 1])],
)
def test_declared_maps_match_real_ones(small_model: nn.Module, size: int, expected: list[int]) -> None:
    head = small_model.head
    declared = head.feature_shape()
    assert list(declared) == ["c4_expand", "final_conv", "extra1", "extra2", "extra3", "extra4"]
    assert [spec.stride for spec in declared.values()] == [16, 32, 64, 128, 256, 512]
    with torch.no_grad():
        maps = head.feature_maps(small_model.backbone(torch.zeros(1, 3, size, size)))
    assert [m.shape[-1] for m in maps] == expected
    assert [m.shape[-2] for m in maps] == [math.ceil(size / spec.stride) for spec in declared.values()]
    assert [m.shape[1] for m in maps] == [spec.channels for spec in declared.values()]


def test_taps_and_extra_depths_follow_the_backbone_declarations() -> None:
    # Width 1.0: layer 15's expansion (576) and the 1280 conv, then 512, 256, 256, 128.
    paper = SSDLiteMobileNetV2(num_classes=91)
    assert [s.channels for s in paper.head.feature_shape().values()] == [576, 1280, 512, 256, 256, 128]
    # Width 0.35: channels read from the backbone; extras max(int(d * 0.35), 16) as TF.
    small = SSDLiteMobileNetV2(num_classes=6, width_mult=0.35)
    backbone_shape = small.backbone.output_shape()
    channels = [s.channels for s in small.head.feature_shape().values()]
    assert channels[:2] == [backbone_shape["c4_expand"].channels, backbone_shape["final_conv"].channels]
    assert channels[2:] == [179, 89, 89, 44]
    # A head on a made-up backbone declaration uses what it is told, by name.
    head = SSDLiteHead(
        {"a": FeatureSpec(40, 8), "b": FeatureSpec(72, 16)},
        num_classes=3,
        in_features=("a", "b"),
        extra_depths=(64,),
    )
    assert head.feature_shape() == {
        "a": FeatureSpec(40, 8),
        "b": FeatureSpec(72, 16),
        "extra1": FeatureSpec(64, 32),
    }
    with pytest.raises(ValueError, match="c4_expand"):
        SSDLiteHead({"c5": FeatureSpec(320, 32)}, num_classes=3)


def test_layers_are_separable() -> None:
    head = SSDLiteMobileNetV2(num_classes=91).head
    for block, (in_ch, depth) in zip(head.extra, [(1280, 512), (512, 256), (256, 256), (256, 128)]):
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
        assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.groups) for c in convs] == [
            (in_ch, depth // 2, (1, 1), (1, 1), 1),
            (depth // 2, depth // 2, (3, 3), (2, 2), depth // 2),
            (depth // 2, depth, (1, 1), (1, 1), 1),
        ]
        assert sum(isinstance(m, nn.BatchNorm2d) for m in block.modules()) == 3
        assert sum(isinstance(m, nn.ReLU6) for m in block.modules()) == 3
    boxes_per_cell = [3, 6, 6, 6, 6, 6]
    channels = [576, 1280, 512, 256, 256, 128]
    for predictors, values in ((head.cls_predictors, 91), (head.box_predictors, 4)):
        for predictor, ch, n in zip(predictors, channels, boxes_per_cell):
            depthwise, pointwise = [m for m in predictor.modules() if isinstance(m, nn.Conv2d)]
            assert (depthwise.kernel_size, depthwise.groups, depthwise.in_channels) == ((3, 3), ch, ch)
            assert (pointwise.kernel_size, pointwise.out_channels) == ((1, 1), n * values)
            assert pointwise.bias is not None


def test_paper_model_size_and_cost() -> None:
    # Table 6: MNet V2 + SSDLite, 4.3M parameters and 0.8B multiply-adds at 300x300.
    model = SSDLiteMobileNetV2().eval()  # the defaults are the paper's COCO model
    assert model.head.num_classes == COCO_NUM_CLASSES_CATEGORY_IDS == 91  # category ids 1..90 + background
    assert COCO_NUM_CLASSES_CONTIGUOUS == 81  # 80 classes numbered 1..80 + background
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 4.3e6) <= 0.1 * 4.3e6, params
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 300, 300))
    madds = counter.get_total_flops() / 2
    assert abs(madds - 0.8e9) <= 0.1 * 0.8e9, madds


def test_forward_outputs(small_model: nn.Module) -> None:
    with torch.no_grad():
        outputs = small_model(torch.zeros(2, 3, 320, 320))
    assert set(outputs) == {"cls_logits", "bbox_regression", "anchors"}
    assert all(isinstance(v, torch.Tensor) for v in outputs.values())  # exportable: tensors only
    assert outputs["cls_logits"].shape == (2, 2034, 6)
    assert outputs["bbox_regression"].shape == (2, 2034, 4)
    assert outputs["anchors"].shape == (2034, 4)
    assert small_model.head.num_anchors((320, 320)) == 2034
    assert small_model.head.num_anchors((300, 300)) == 1917


# ---------------------------------------------------------------------------------------- loss
def _outputs(
    num_images: int, anchors: torch.Tensor, num_classes: int = 4, seed: int = 0
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "cls_logits": torch.randn(
            num_images, len(anchors), num_classes, generator=generator, requires_grad=True
        ),
        "bbox_regression": torch.randn(num_images, len(anchors), 4, generator=generator, requires_grad=True),
        "anchors": anchors,
    }


def _grid_anchors(n: int = 10) -> torch.Tensor:
    """n x n non-overlapping unit cells of the image, so IoUs are easy to reason about."""
    step = 1.0 / n
    ys, xs = torch.meshgrid(torch.arange(n) * step, torch.arange(n) * step, indexing="ij")
    return torch.stack([xs, ys, xs + step, ys + step], dim=-1).reshape(-1, 4)


def _head(**kwargs) -> SSDLiteHead:
    return SSDLiteHead(
        {"c4_expand": FeatureSpec(8, 16), "final_conv": FeatureSpec(8, 32)}, num_classes=4, **kwargs
    )


def test_hard_negative_mining_loss_by_hand() -> None:
    anchors = _grid_anchors()
    outputs = _outputs(1, anchors)
    # The ground truth is exactly anchor 11: one positive, so 3 negatives are mined.
    targets = [{"boxes": anchors[11:12] * TO_PIXELS, "labels": torch.tensor([2])}]
    losses = _head().loss(outputs, targets, IMAGE)
    logits, deltas = outputs["cls_logits"][0].detach(), outputs["bbox_regression"][0].detach()
    labels = torch.zeros(100, dtype=torch.int64)
    labels[11] = 2
    ce = F.cross_entropy(logits, labels, reduction="none")
    negatives = ce.clone()
    negatives[11] = -1
    expected_cls = ce[11] + negatives.topk(3).values.sum()
    assert losses["loss_cls"].item() == pytest.approx(expected_cls.item(), rel=1e-5)
    expected_box = F.smooth_l1_loss(deltas[11], torch.zeros(4), reduction="sum")  # exact anchor: zero deltas
    assert losses["loss_box"].item() == pytest.approx(expected_box.item(), rel=1e-5)


def test_loss_is_normalised_by_positives_and_ignores_crowd() -> None:
    anchors = _grid_anchors()
    outputs = _outputs(2, anchors)
    targets = [
        {"boxes": anchors[[0, 55]] * TO_PIXELS, "labels": torch.tensor([1, 3])},
        {"boxes": anchors[[99]] * TO_PIXELS, "labels": torch.tensor([2])},
    ]
    head = _head()
    loss = head.loss(outputs, targets, IMAGE)
    labels, _, ignore = head.match(outputs, normalised_targets(targets, IMAGE))  # match: the anchors' frame
    assert labels[0, [0, 55]].tolist() == [1, 3] and labels[1, 99].item() == 2
    assert (labels > 0).sum().item() == 3 and not ignore.any()
    # Crowd regions turn the negatives inside them into ignored anchors, not positives.
    crowd_targets = [dict(targets[0], crowd_boxes=torch.tensor([[0.5, 0.0, 1.0, 0.5]]) * TO_PIXELS), targets[1]]
    labels_c, _, ignore_c = head.match(outputs, normalised_targets(crowd_targets, IMAGE))
    assert ignore_c[0].sum().item() == 25 and (labels_c == labels).all()
    assert torch.isfinite(head.loss(outputs, crowd_targets, IMAGE)["loss_cls"])
    assert loss["loss_cls"].item() > 0 and loss["loss_box"].item() > 0


@pytest.mark.parametrize("loss_type", ["hard_negative_mining", "focal"])
def test_images_without_objects_train_without_nan(loss_type: str) -> None:
    head = _head(loss_type=loss_type)
    outputs = _outputs(2, _grid_anchors())
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = head.loss(outputs, empty, IMAGE)
    assert losses["loss_box"].item() == 0.0
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"].item() > 0  # negatives still teach
    (losses["loss_cls"] + losses["loss_box"]).backward()
    assert torch.isfinite(outputs["cls_logits"].grad).all()
    assert outputs["cls_logits"].grad.abs().sum() > 0
    # A batch mixing an empty image with a full one.
    outputs = _outputs(2, _grid_anchors())
    mixed = [empty[0], {"boxes": torch.tensor([[50.0, 30.0, 150.0, 90.0]]), "labels": torch.tensor([1])}]
    losses = head.loss(outputs, mixed, IMAGE)
    assert losses["loss_box"].item() > 0
    assert all(torch.isfinite(v) for v in losses.values())


def test_hard_negative_mining_keeps_min_negatives_on_empty_images() -> None:
    head = _head(min_negatives_per_image=5)
    outputs = _outputs(1, _grid_anchors())
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    ce = F.cross_entropy(
        outputs["cls_logits"][0].detach(), torch.zeros(100, dtype=torch.int64), reduction="none"
    )
    assert head.loss(outputs, empty, IMAGE)["loss_cls"].item() == pytest.approx(
        ce.topk(5).values.sum().item(), rel=1e-5
    )


def test_real_model_loss_backward() -> None:
    model = SSDLiteMobileNetV2(num_classes=6, width_mult=0.35).train()
    outputs = model(torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8))
    targets = [
        {"boxes": torch.tensor([[12.8, 25.6, 64.0, 89.6]]), "labels": torch.tensor([3])},  # pixels of the input
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    losses = model.loss(outputs, targets, (128, 128))
    assert losses["loss_box"].item() > 0
    (losses["loss_cls"] + losses["loss_box"]).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------- postprocessing
def test_postprocess_limits_and_order() -> None:
    head = _head(score_threshold=0.2, detections_per_image=100, nms_threshold=0.5)
    anchors = torch.rand(400, 2) * 0.8
    anchors = torch.cat([anchors, anchors + 0.1 + torch.rand(400, 2) * 0.1], dim=1)
    generator = torch.Generator().manual_seed(1)
    outputs = {
        "cls_logits": torch.randn(3, 400, 4, generator=generator) * 4,
        "bbox_regression": torch.zeros(3, 400, 4),
        "anchors": anchors,
    }
    sizes = torch.tensor([[480, 640], [100, 100], [333, 250]])
    results = head.postprocess(outputs, sizes)
    assert len(results) == 3
    for result, (height, width) in zip(results, sizes.tolist()):
        assert set(result) == {"boxes", "scores", "labels"}
        n = len(result["scores"])
        assert 0 < n <= 100
        assert result["boxes"].shape == (n, 4) and result["labels"].dtype == torch.int64
        assert (result["scores"] > 0.2).all()
        assert (result["scores"][:-1] >= result["scores"][1:]).all()
        assert result["labels"].min() >= 1 and result["labels"].max() <= 3
        boxes = result["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= height).all()
        # Per-class NMS: no two boxes of one class overlap above the threshold.
        for label in result["labels"].unique():
            same = boxes[result["labels"] == label]
            assert box_iou(same, same).fill_diagonal_(0).max() <= 0.5 + 1e-6
    few = _head(score_threshold=0.0, detections_per_image=7).postprocess(outputs, sizes)
    assert [len(r["scores"]) for r in few] == [7, 7, 7]


def test_postprocess_recovers_encoded_boxes_in_original_pixels() -> None:
    head = _head(score_threshold=0.5)
    anchors = _grid_anchors()
    truth = torch.tensor([[0.12, 0.31, 0.28, 0.52], [0.6, 0.55, 0.95, 0.9]])  # normalised xyxy
    logits = torch.full((1, 100, 4), -10.0)
    logits[..., 0] = 10.0  # background everywhere ...
    deltas = torch.zeros(1, 100, 4)
    for anchor, box, label in zip([22, 77], truth, [1, 3]):  # ... except two confident anchors
        logits[0, anchor] = -10.0
        logits[0, anchor, label] = 10.0
        deltas[0, anchor] = encode_boxes(box[None], anchors[anchor][None])[0]
    outputs = {"cls_logits": logits, "bbox_regression": deltas, "anchors": anchors}
    (result,) = head.postprocess(outputs, [(480, 640)])  # original image: 640 wide, 480 high
    order = result["labels"].argsort()
    assert result["labels"][order].tolist() == [1, 3]
    expected = truth * torch.tensor([640, 480, 640, 480])
    torch.testing.assert_close(result["boxes"][order], expected, atol=1e-3, rtol=0)


def test_focal_head_scores_are_sigmoids_and_start_as_background() -> None:
    head = _head(loss_type="focal")
    bias = head.cls_predictors[0][-1].bias
    assert torch.allclose(bias, torch.full_like(bias, -math.log(99)))
    logits = torch.zeros(1, 2, 4)
    assert torch.allclose(head.scores(logits), torch.full((1, 2, 3), 0.5))
    softmax_head = _head()
    assert torch.allclose(softmax_head.scores(logits), torch.full((1, 2, 3), 0.25))


def test_backbone_maps_by_name_only() -> None:
    backbone = MobileNetV2(width_mult=0.35, out_features=("c3", "c4_expand", "final_conv")).eval()
    head = SSDLiteHead(backbone.output_shape(), num_classes=3).eval()  # batch 1: BN of the 1x1 map
    with torch.no_grad():
        outputs = head(backbone(torch.zeros(1, 3, 160, 160)))
    assert outputs["cls_logits"].shape == (1, head.num_anchors((160, 160)), 3)


# --------------------------------------------------------------------------- valid label slots
# COCO's 80 category ids in 1..90: the 10 ids it never uses are slots without a category.
COCO_UNUSED_IDS = [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
COCO_IDS = [i for i in range(1, 91) if i not in COCO_UNUSED_IDS]


@pytest.mark.parametrize("loss_type", ["hard_negative_mining", "focal"])
def test_unused_label_slots_are_never_emitted(loss_type: str) -> None:
    head = SSDLiteHead(
        {"c4_expand": FeatureSpec(8, 16), "final_conv": FeatureSpec(8, 32)}, num_classes=91, loss_type=loss_type
    )
    head.set_valid_labels(COCO_IDS)
    assert head.valid_labels.sum().item() == 81 and head.valid_labels[0]  # 80 classes + background
    assert not head.valid_labels[COCO_UNUSED_IDS].any()
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 100, 91, generator=generator)
    logits[..., COCO_UNUSED_IDS] += 8.0  # random logits that favour the unused ids
    outputs = {"cls_logits": logits, "bbox_regression": torch.zeros(2, 100, 4), "anchors": _grid_anchors()}
    assert head.scores(logits)[..., [i - 1 for i in COCO_UNUSED_IDS]].eq(0).all()
    # Without the mask the top detections are exactly those ids (what crashed COCO evaluation).
    unmasked = SSDLiteHead(
        {"c4_expand": FeatureSpec(8, 16), "final_conv": FeatureSpec(8, 32)}, num_classes=91, loss_type=loss_type
    ).postprocess(outputs, [(300, 300)] * 2)
    assert set(unmasked[0]["labels"][:10].tolist()) <= set(COCO_UNUSED_IDS)
    for result in head.postprocess(outputs, [(300, 300)] * 2):
        assert len(result["labels"]) == 100
        assert set(result["labels"].tolist()) <= set(COCO_IDS)
    # The same on the flat tensors exports run.
    _, _, labels, _ = head.detections(outputs, torch.tensor([[300, 300]] * 2))
    assert not torch.isin(labels, torch.tensor(COCO_UNUSED_IDS)).any()


def _remapped(outputs: dict[str, torch.Tensor], valid: list[int]) -> dict[str, torch.Tensor]:
    """The outputs of a head whose classes are only ``valid`` (background first), renumbered."""
    return dict(outputs, cls_logits=outputs["cls_logits"][..., [0, *valid]])


@pytest.mark.parametrize("loss_type", ["hard_negative_mining", "focal"])
def test_loss_ignores_the_logits_of_invalid_slots(loss_type: str) -> None:
    valid = [1, 3, 4]  # labels 2 and 5 have no category
    head = SSDLiteHead(
        {"c4_expand": FeatureSpec(8, 16), "final_conv": FeatureSpec(8, 32)}, num_classes=6, loss_type=loss_type
    )
    head.set_valid_labels(valid)
    anchors = _grid_anchors()
    outputs = _outputs(2, anchors, num_classes=6)
    targets = [
        {"boxes": anchors[[0, 55]] * TO_PIXELS, "labels": torch.tensor([1, 4])},
        {"boxes": anchors[[99]] * TO_PIXELS, "labels": torch.tensor([3])},
    ]
    losses = head.loss(outputs, targets, IMAGE)
    # Softmax over the valid classes only: the loss of a head with just those classes.
    reduced = SSDLiteHead(
        {"c4_expand": FeatureSpec(8, 16), "final_conv": FeatureSpec(8, 32)}, num_classes=4, loss_type=loss_type
    )
    renumber = torch.zeros(6, dtype=torch.int64)
    renumber[valid] = torch.arange(1, len(valid) + 1)
    reduced_targets = [dict(t, labels=renumber[t["labels"]]) for t in targets]
    expected = reduced.loss(_remapped(outputs, valid), reduced_targets, IMAGE)
    for key in ("loss_cls", "loss_box"):
        assert losses[key].item() == pytest.approx(expected[key].item(), rel=1e-6), key
    # Whatever the invalid logits are, the loss does not change and they get no gradient.
    changed = dict(outputs, cls_logits=outputs["cls_logits"].detach().clone())
    changed["cls_logits"][..., [2, 5]] = torch.randn(2, 100, 2) * 50
    changed["cls_logits"].requires_grad_(True)
    again = head.loss(changed, targets, IMAGE)
    assert again["loss_cls"].item() == pytest.approx(losses["loss_cls"].item(), rel=1e-6)
    again["loss_cls"].backward()
    grad = changed["cls_logits"].grad
    assert torch.isfinite(grad).all() and grad[..., [2, 5]].eq(0).all() and grad[..., valid].abs().sum() > 0


def test_valid_labels_are_checked_and_survive_state_dicts() -> None:
    head = _head()
    with pytest.raises(ValueError, match="1..3"):
        head.set_valid_labels([1, 4])
    with pytest.raises(ValueError, match="non-empty"):
        head.set_valid_labels([])
    head.set_valid_labels({2: 7})  # a {label: category id} map: its labels
    assert head.valid_labels.tolist() == [True, False, True, False]
    state = head.state_dict()
    assert state["valid_labels"].tolist() == [True, False, True, False]  # persistent: in checkpoints
    fresh = _head()
    fresh.load_state_dict(state)
    assert fresh.valid_labels.tolist() == [True, False, True, False]
    # A state dict written before the buffer existed loads strictly: every label stays valid.
    old = {k: v for k, v in state.items() if k != "valid_labels"}
    older = _head()
    older.load_state_dict(old)
    assert older.valid_labels.all()
    assert "valid_labels" not in old  # the caller's dict is left as it was
    with pytest.raises(ValueError, match="score_threshold"):
        _head(score_threshold=-0.1)


@pytest.mark.parametrize("export_format", ["onnx", "torchscript"])
def test_exported_detector_keeps_the_label_mask(export_format: str, tmp_path: Path) -> None:
    from tasks.deploy import ExportableDetector, export_onnx, export_torchscript, load_runner

    torch.manual_seed(0)
    model = SSDLiteMobileNetV2(num_classes=91, width_mult=0.35).eval()
    model.head.set_valid_labels(COCO_IDS)
    with torch.no_grad():  # decisive scores that favour the unused ids, as in the test above
        for predictor in model.head.cls_predictors:
            predictor[-1].weight.mul_(30)
            predictor[-1].bias.view(-1, 91)[:, COCO_UNUSED_IDS] += 5.0
    module = ExportableDetector(model).eval()
    path = tmp_path / f"det.{'onnx' if export_format == 'onnx' else 'pt'}"
    if export_format == "onnx":
        export_onnx(module, torch.rand(1, 3, 128, 128) * 255, path, dynamic_size=False)
    else:
        export_torchscript(module, torch.rand(1, 3, 128, 128) * 255, path)
    run = load_runner(path, export_format, threads=1)
    images = torch.rand(2, 3, 128, 128) * 255  # RGB pixels: the exported network normalises too
    with torch.no_grad():
        boxes, scores, labels, index = module(images)
    got_boxes, got_scores, got_labels, got_index = (torch.from_numpy(a) for a in run(images.numpy()))
    assert len(labels) > 0 and not torch.isin(got_labels, torch.tensor(COCO_UNUSED_IDS)).any()
    # The export finds PyTorch's detections: same image, label and box (near-tied scores may
    # be ordered differently by two runtimes, so as sets).
    same = (labels[:, None] == got_labels[None]) & (index[:, None] == got_index[None])
    same &= box_iou(boxes, got_boxes) >= 0.99
    assert same.any(dim=1).float().mean() >= 0.99 and abs(len(got_scores) - len(scores)) <= 0.02 * len(scores)


def test_head_batchnorm_is_torchvisions_and_the_backbone_keeps_its_own() -> None:
    model = SSDLiteMobileNetV2(num_classes=6, width_mult=0.35)
    head_bns = [m for m in model.head.modules() if isinstance(m, nn.BatchNorm2d)]
    backbone_bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(head_bns) == 4 * 3 + 2 * 6  # extra layers 4 x 3, predictors (cls, box) x 6 maps
    assert all((bn.eps, bn.momentum) == (1e-3, 0.03) for bn in head_bns)
    assert backbone_bns and all((bn.eps, bn.momentum) == (1e-5, 0.1) for bn in backbone_bns)


@pytest.mark.parametrize("loss_type", ["hard_negative_mining", "focal"])
def test_per_image_normalisation_averages_each_images_own_normalised_loss(loss_type: str) -> None:
    anchors = _grid_anchors()
    outputs = _outputs(2, anchors)
    targets = [
        {"boxes": anchors[[0, 55, 70]] * TO_PIXELS, "labels": torch.tensor([1, 3, 2])},  # 3 positives
        {"boxes": anchors[[99]] * TO_PIXELS, "labels": torch.tensor([2])},  # 1 positive
    ]
    per_image = _head(loss_type=loss_type, loss_normalization="image").loss(outputs, targets, IMAGE)
    batch_head = _head(loss_type=loss_type)  # per batch: one image alone is normalised by its own positives
    alone = [
        batch_head.loss({k: v[i : i + 1] if k != "anchors" else v for k, v in outputs.items()}, [t], IMAGE)
        for i, t in enumerate(targets)
    ]
    for key in ("loss_cls", "loss_box"):
        torch.testing.assert_close(per_image[key], (alone[0][key] + alone[1][key]) / 2)
    whole_batch = batch_head.loss(outputs, targets, IMAGE)  # 4 positives in the batch: different weights
    assert not torch.allclose(whole_batch["loss_box"], per_image["loss_box"])
    with pytest.raises(ValueError, match="loss_normalization must be 'batch' or 'image'"):
        _head(loss_normalization="anchor")


def test_force_match_gives_a_box_below_the_iou_threshold_its_best_anchor() -> None:
    anchors = _grid_anchors()
    outputs = _outputs(1, anchors)
    # A quarter of anchor 33 (IoU 0.25 with it, 0 with the others): only forcing gives it a positive.
    box = anchors[[33]].clone()
    box[:, 2:] = (box[:, :2] + box[:, 2:]) / 2
    targets = normalised_targets([{"boxes": box * TO_PIXELS, "labels": torch.tensor([4])}], IMAGE)
    forced, _, _ = _head().match(outputs, targets)
    assert forced[0].nonzero().flatten().tolist() == [33] and forced[0, 33].item() == 4
    unforced, _, _ = _head(force_match=False).match(outputs, targets)
    assert not unforced.any()
