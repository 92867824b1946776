"""heads/anchors.py: default boxes against hand-computed values, box coding, matching."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch

from heads.anchors import (
    BACKGROUND,
    IGNORE,
    DefaultBoxes,
    DefaultBoxGenerator,
    decode_boxes,
    encode_boxes,
    grid_anchors,
    match_anchors,
    ssd_box_specs,
)
from heads.ssdlite import SSDLiteHead

SIZES_300 = [(19, 19), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
SIZES_320 = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]


def test_box_specs_follow_the_tf_ssdlite_config() -> None:
    specs = ssd_box_specs()
    assert [len(layer) for layer in specs] == [3, 6, 6, 6, 6, 6]
    # Layer 0 (reduce_boxes_in_lowest_layer): (0.1, 1), (min_scale, 2), (min_scale, 1/2).
    assert specs[0] == [(0.1, 1.0), (0.2, 2.0), (0.2, 0.5)]
    # Scales spaced by (0.95 - 0.2) / 5 = 0.15; the sixth box is at sqrt(s_k * s_k+1), ratio 1.
    for layer, scale in enumerate([0.35, 0.5, 0.65, 0.8, 0.95], start=1):
        ratios = [ratio for _, ratio in specs[layer]]
        assert ratios == pytest.approx([1.0, 2.0, 0.5, 3.0, 1 / 3, 1.0])
        assert [s for s, _ in specs[layer][:5]] == pytest.approx([scale] * 5)
        next_scale = scale + 0.15 if layer < 5 else 1.0
        assert specs[layer][5][0] == pytest.approx(math.sqrt(scale * next_scale))


def test_box_specs_options() -> None:
    specs = ssd_box_specs(
        3,
        scales=[0.1, 0.4, 0.7],
        aspect_ratios=(1.0, 2.0),
        reduce_boxes_in_lowest_layer=False,
        interpolated_scale_aspect_ratio=0.0,
    )
    assert specs == [[(0.1, 1.0), (0.1, 2.0)], [(0.4, 1.0), (0.4, 2.0)], [(0.7, 1.0), (0.7, 2.0)]]
    with pytest.raises(ValueError, match="3 scales for 2 layers"):
        ssd_box_specs(2, scales=[0.1, 0.2, 0.3])


def test_default_boxes_are_one_value_written_once() -> None:
    boxes = DefaultBoxes()
    assert boxes.specs() == ssd_box_specs() == ssd_box_specs(6)
    assert DefaultBoxes(min_scale=0.1, max_scale=0.5).specs(3) == ssd_box_specs(3, min_scale=0.1, max_scale=0.5)
    assert DefaultBoxes(min_scale=0.1, max_scale=0.5).specs(3)[1][0] == pytest.approx((0.3, 1.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        boxes.min_scale = 0.3  # type: ignore[misc]  # a default argument must not be changed in place
    # The head's default is this value, not a copy of its numbers.
    assert inspect.signature(SSDLiteHead.__init__).parameters["default_boxes"].default == DefaultBoxes()
    assert DefaultBoxGenerator.ssd().box_specs == DefaultBoxGenerator(boxes.specs()).box_specs
    with pytest.raises(ValueError, match="num_layers must be at least 1"):
        boxes.specs(0)
    with pytest.raises(ValueError, match="aspect_ratios must be positive"):
        DefaultBoxes(aspect_ratios=(1.0, -2.0)).specs()


def test_anchor_counts_at_300_and_320() -> None:
    generator = DefaultBoxGenerator.ssd()
    # 19*19*3 + (100 + 25 + 9 + 4 + 1) * 6 = 1083 + 834
    assert generator.num_anchors(SIZES_300) == 1917 == generator(SIZES_300).shape[0]
    assert generator.num_anchors(SIZES_320) == 2034 == generator(SIZES_320).shape[0]


def test_anchor_geometry_by_hand() -> None:
    anchors = DefaultBoxGenerator.ssd()(SIZES_300).double()
    c = 0.5 / 19  # centre of cell (0, 0) of the 19x19 map
    assert anchors[0].tolist() == pytest.approx([c - 0.05, c - 0.05, c + 0.05, c + 0.05])
    w, h = 0.2 * math.sqrt(2), 0.2 / math.sqrt(2)  # (0.2, ratio 2)
    assert anchors[1].tolist() == pytest.approx([c - w / 2, c - h / 2, c + w / 2, c + h / 2])
    assert anchors[2].tolist() == pytest.approx([c - h / 2, c - w / 2, c + h / 2, c + w / 2])
    # Cell (row 0, column 1) follows the three boxes of cell (0, 0): the order is (row, column, box).
    c1 = 1.5 / 19
    assert anchors[3].tolist() == pytest.approx([c1 - 0.05, c - 0.05, c1 + 0.05, c + 0.05])
    # Row 1, column 0 starts after the 19 cells of row 0.
    assert anchors[19 * 3].tolist() == pytest.approx([c - 0.05, c1 - 0.05, c + 0.05, c1 + 0.05])
    # First box of the 10x10 map: scale 0.35, ratio 1, centred at 0.05.
    assert anchors[1083].tolist() == pytest.approx([0.05 - 0.175, 0.05 - 0.175, 0.05 + 0.175, 0.05 + 0.175])
    # Ratio 3 box of that cell: 0.35 * sqrt(3) wide, 0.35 / sqrt(3) high.
    w3, h3 = 0.35 * math.sqrt(3), 0.35 / math.sqrt(3)
    assert anchors[1086].tolist() == pytest.approx(
        [0.05 - w3 / 2, 0.05 - h3 / 2, 0.05 + w3 / 2, 0.05 + h3 / 2]
    )
    # The last box: the 1x1 map's interpolated box, sqrt(0.95 * 1.0), centred in the image.
    s = math.sqrt(0.95)
    assert anchors[-1].tolist() == pytest.approx([0.5 - s / 2, 0.5 - s / 2, 0.5 + s / 2, 0.5 + s / 2])


def test_anchors_are_cached_per_feature_map_size() -> None:
    generator = DefaultBoxGenerator.ssd()
    first = generator(SIZES_300)
    assert generator(SIZES_300) is first  # no recomputation per batch
    assert generator(SIZES_320) is not first
    assert generator(SIZES_300, dtype=torch.float64).dtype == torch.float64
    # Made in a validation loop's inference mode, they are remade for training and tracing.
    generator = DefaultBoxGenerator.ssd()
    with torch.inference_mode():
        assert generator(SIZES_300).is_inference()
    fresh = generator(SIZES_300)
    assert not fresh.is_inference() and generator(SIZES_300) is fresh
    with pytest.raises(ValueError, match="5 feature maps for 6 anchor layers"):
        generator(SIZES_300[:5])


def test_square_boxes_stay_square_in_pixels_on_a_wide_input() -> None:
    # A 2:1 input (e.g. 320 x 640): a ratio-1 box must cover half as much of the width as of the height.
    box = grid_anchors((10, 20), [(0.4, 1.0)], aspect_correction=(10 / 20, 10 / 10))[0]
    width, height = (box[2] - box[0]).item(), (box[3] - box[1]).item()
    assert width == pytest.approx(0.2) and height == pytest.approx(0.4)
    generator = DefaultBoxGenerator([[(0.4, 1.0)], [(0.8, 1.0)]])
    anchors = generator([(10, 20), (5, 10)])
    assert (anchors[:, 2] - anchors[:, 0]) * 640 == pytest.approx((anchors[:, 3] - anchors[:, 1]) * 320)


def test_encode_by_hand_and_round_trip() -> None:
    anchor = torch.tensor([[0.2, 0.2, 0.4, 0.6]])  # centre (0.3, 0.4), 0.2 x 0.4
    box = torch.tensor([[0.22, 0.16, 0.62, 0.56]])  # centre (0.42, 0.36), 0.4 x 0.4
    deltas = encode_boxes(box, anchor)
    expected = [10 * 0.12 / 0.2, 10 * -0.04 / 0.4, 5 * math.log(2.0), 5 * math.log(1.0)]
    assert deltas[0].tolist() == pytest.approx(expected, abs=1e-5)

    generator = torch.Generator().manual_seed(0)
    anchors = DefaultBoxGenerator.ssd()(SIZES_300)
    centre = torch.rand(len(anchors), 2, generator=generator)
    size = torch.rand(len(anchors), 2, generator=generator) * 0.5 + 0.01
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    decoded = decode_boxes(encode_boxes(boxes, anchors), anchors)
    torch.testing.assert_close(decoded, boxes, atol=1e-5, rtol=0)
    # Batched deltas broadcast against the anchors.
    batched = decode_boxes(encode_boxes(boxes, anchors).expand(2, -1, -1), anchors)
    torch.testing.assert_close(batched[1], boxes, atol=1e-5, rtol=0)


def test_decode_clamps_huge_size_deltas() -> None:
    decoded = decode_boxes(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), torch.tensor([[0.4, 0.4, 0.6, 0.6]]))
    assert torch.isfinite(decoded).all()
    assert (decoded[0, 2] - decoded[0, 0]).item() == pytest.approx(
        0.2 * 1000 / 16, rel=1e-5
    )  # exp(log(1000 / 16)) * 0.2


def test_matching_threshold_force_match_empty_and_crowd() -> None:
    anchors = torch.tensor(
        [
            [0.0, 0.0, 0.2, 0.2],  # IoU 1 with gt 0
            [0.0, 0.0, 0.2, 0.3],  # IoU 0.667 with gt 0
            [0.5, 0.5, 0.7, 0.7],  # IoU 0.25 with gt 1: below 0.5, but gt 1's best anchor
            [0.8, 0.8, 1.0, 1.0],  # overlaps nothing
            [0.55, 0.05, 0.65, 0.15],  # inside the crowd region
        ]
    )
    gt = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]])
    matches = match_anchors(gt, anchors)
    assert matches.tolist() == [0, 0, 1, BACKGROUND, BACKGROUND]
    # Without forcing, gt 1 gets nothing: 0.25 < 0.5 (and anchor 3 has IoU 0.25 too).
    assert match_anchors(gt, anchors, force_match=False).tolist() == [0, 0, -1, -1, -1]
    crowd = torch.tensor([[0.5, 0.0, 0.7, 0.2]])
    assert match_anchors(gt, anchors, crowd_boxes=crowd).tolist() == [0, 0, 1, BACKGROUND, IGNORE]
    assert match_anchors(torch.zeros(0, 4), anchors).tolist() == [BACKGROUND] * 5
    # A box that overlaps no anchor cannot be forced onto one (its best "anchor" would be index 0).
    away = torch.cat([torch.tensor([[2.0, 2.0, 2.1, 2.1]]), gt])
    assert match_anchors(away, anchors).tolist() == [1, 1, 2, BACKGROUND, BACKGROUND]
    assert match_anchors(torch.zeros(0, 4), anchors, crowd_boxes=crowd).tolist() == [-1, -1, -1, -1, IGNORE]
