"""tasks/evaluation/coco_map.py: numbers equal pycocotools', the metric equals the function, DDP."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tasks.evaluation.coco_map import SUMMARY_KEYS, COCOMeanAveragePrecision, evaluate_detections


@pytest.fixture(scope="module")
def val_gt(synthetic_coco: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(synthetic_coco / "annotations" / "instances_val2017.json"))


def hand_made_results(gt: COCO, seed: int = 0) -> list[dict]:
    """Jittered true boxes, some with the wrong class, some missed, plus false positives."""
    rng = np.random.default_rng(seed)
    category_ids = sorted(gt.getCatIds())
    results = []
    for ann in gt.dataset["annotations"]:
        if ann["iscrowd"] or rng.random() < 0.15:
            continue
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        category = ann["category_id"] if rng.random() > 0.1 else int(rng.choice(category_ids))
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": category,
                "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])],
                "score": float(rng.uniform(0.05, 1.0)),
            }
        )
    for image_id in gt.getImgIds():
        for _ in range(3):
            x, y = rng.uniform(0, 150, 2)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(rng.choice(category_ids)),
                    "bbox": [float(x), float(y), float(rng.uniform(5, 80)), float(rng.uniform(5, 80))],
                    "score": float(rng.uniform(0.0, 0.6)),
                }
            )
    return results


def pycocotools_stats(gt: COCO, results: list[dict]) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(json.loads(json.dumps(results))), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_hand_made_predictions_equal_pycocotools(val_gt: COCO, backend: str) -> None:
    results = hand_made_results(val_gt)
    expected = pycocotools_stats(val_gt, results)
    summary = evaluate_detections(val_gt, results, backend=backend)
    assert [summary[key] for key in SUMMARY_KEYS] == pytest.approx(expected.tolist(), abs=1e-6)
    assert 0.2 < summary["AP"] < 0.9  # a meaningful, non-trivial number
    assert set(summary["per_class"]) == set(val_gt.getCatIds())
    # The input list is left as given (COCO's loaders write ids and areas into their copies).
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"}


def test_perfect_predictions_score_one_and_none_score_zero(val_gt: COCO, synthetic_coco: Path) -> None:
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in val_gt.dataset["annotations"]
        if not a["iscrowd"]
    ]
    for backend in ("pycocotools", "faster"):
        summary = evaluate_detections(val_gt, perfect, backend=backend)
        assert summary["AP"] == pytest.approx(1.0) and summary["AP50"] == pytest.approx(1.0)
        assert all(ap == pytest.approx(1.0) for ap in summary["per_class"].values())
        empty = evaluate_detections(val_gt, [], backend=backend)
        assert empty["AP"] == 0.0 and empty["AR100"] == 0.0
    # A path and a dataset dict work as ground truth too.
    path = synthetic_coco / "annotations" / "instances_val2017.json"
    assert evaluate_detections(path, perfect)["AP"] == pytest.approx(1.0)
    assert evaluate_detections(json.loads(path.read_text()), perfect)["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_detections(val_gt, [dict(perfect[0], image_id=10**9)])


def _as_batches(
    gt: COCO, results: list[dict], label_of: dict[int, int]
) -> list[tuple[torch.Tensor, list[dict]]]:
    """The results as metric inputs: per image xyxy boxes and contiguous labels, in batches of 3."""
    image_ids = sorted(gt.getImgIds())
    per_image = {i: [r for r in results if r["image_id"] == i] for i in image_ids}
    batches = []
    for start in range(0, len(image_ids), 3):
        ids = image_ids[start : start + 3]
        detections = []
        for i in ids:
            rows = per_image[i]
            xywh = torch.tensor([r["bbox"] for r in rows], dtype=torch.float32).reshape(-1, 4)
            detections.append(
                {
                    "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
                    "scores": torch.tensor([r["score"] for r in rows], dtype=torch.float32),
                    "labels": torch.tensor([label_of[r["category_id"]] for r in rows], dtype=torch.int64),
                }
            )
        batches.append((torch.tensor(ids), detections))
    return batches


def _label_maps(gt: COCO) -> tuple[dict[int, int], dict[int, int]]:
    ids = sorted(gt.getCatIds())
    return {c: i for i, c in enumerate(ids, start=1)}, {i: c for i, c in enumerate(ids, start=1)}


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_equals_the_function_and_skips_repeated_images(val_gt: COCO) -> None:
    results = hand_made_results(val_gt, seed=1)
    label_of, category_of = _label_maps(val_gt)
    expected = evaluate_detections(val_gt, results, backend="pycocotools")
    metric = COCOMeanAveragePrecision(val_gt, category_of)
    batches = _as_batches(val_gt, results, label_of)
    for ids, detections in batches:
        metric.update(ids, detections)
    # A DistributedSampler pads with repeated images: a second, different report of an image
    # already seen must not count.
    ids, detections = batches[0]
    metric.update(ids, [{k: v[:1] for k, v in d.items()} for d in detections])
    computed = metric.compute()
    assert [computed[key].item() for key in SUMMARY_KEYS] == pytest.approx(
        [expected[key] for key in SUMMARY_KEYS], abs=1e-6
    )
    metric.reset()
    assert metric.compute()["AP"].item() == 0.0  # nothing seen: zeros, not a crash


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_evaluates_only_the_images_seen_and_needs_ground_truth(val_gt: COCO) -> None:
    results = hand_made_results(val_gt, seed=2)
    label_of, category_of = _label_maps(val_gt)
    batches = _as_batches(val_gt, results, label_of)
    metric = COCOMeanAveragePrecision(val_gt, category_of, backend="pycocotools")
    metric.update(*batches[0])
    seen = batches[0][0].tolist()
    expected = evaluate_detections(val_gt, [r for r in results if r["image_id"] in seen], image_ids=seen)
    assert metric.compute()["AP"].item() == pytest.approx(expected["AP"], abs=1e-6)
    empty = COCOMeanAveragePrecision(val_gt, category_of)
    empty.update(
        batches[0][0],
        [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}]
        * len(batches[0][0]),
    )
    assert empty.compute()["AP"].item() == 0.0
    with pytest.raises(RuntimeError, match="set_ground_truth"):
        COCOMeanAveragePrecision().compute()


def _ddp_worker(
    rank: int, world_size: int, init_file: str, gt_dataset: dict, shards: list, out_dir: str
) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        gt = COCO()
        gt.dataset = gt_dataset
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        _, category_of = _label_maps(gt)
        metric = COCOMeanAveragePrecision(gt, category_of, backend="pycocotools")
        for ids, detections in shards[rank]:
            metric.update(ids, detections)
        result = {key: value.item() for key, value in metric.compute().items()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_gathers_all_ranks_and_equals_one_process(val_gt: COCO) -> None:
    results = hand_made_results(val_gt, seed=3)
    label_of, category_of = _label_maps(val_gt)
    single = COCOMeanAveragePrecision(val_gt, category_of, backend="pycocotools")
    batches = _as_batches(val_gt, results, label_of)
    for batch in batches:
        single.update(*batch)
    expected = {key: value.item() for key, value in single.compute().items()}
    # DistributedSampler's split over 2 ranks: rank r takes every other batch; the last rank is
    # padded with a repeat of the first batch's images.
    shards = [batches[0::2], batches[1::2] + [batches[0]]]
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_ddp_worker, args=(2, init_file, val_gt.dataset, shards, tmp), nprocs=2, join=True)
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
    for result in per_rank:
        assert result == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_results_of_unknown_categories_are_not_scored_as_in_pycocotools(val_gt: COCO, backend: str) -> None:
    results = hand_made_results(val_gt, seed=4)
    known = sorted(val_gt.getCatIds())  # 1, 3, 7, 12, 44
    extra = [dict(r, category_id=2, score=0.99) for r in results[:7]] + [dict(results[0], category_id=999)]
    mixed = results + extra
    # pycocotools' COCOeval scores the ground truth's categories only: the extra results change nothing.
    expected = pycocotools_stats(val_gt, mixed)
    assert expected.tolist() == pytest.approx(pycocotools_stats(val_gt, results).tolist(), abs=1e-12)
    summary = evaluate_detections(val_gt, mixed, backend=backend)
    assert [summary[key] for key in SUMMARY_KEYS] == pytest.approx(expected.tolist(), abs=1e-6)
    assert summary["unscored_detections"] == 8 and summary["unscored_category_ids"] == [2, 999]
    assert set(summary["per_class"]) == set(known)
    clean = evaluate_detections(val_gt, results, backend=backend)
    assert clean["unscored_detections"] == 0 and clean["unscored_category_ids"] == []
    # Only unknown categories: nothing to score, no crash.
    only = evaluate_detections(val_gt, extra, backend=backend)
    assert only["AP"] == 0.0 and only["unscored_detections"] == 8


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_drops_and_reports_labels_without_a_category(val_gt: COCO) -> None:
    results = hand_made_results(val_gt, seed=5)
    label_of, category_of = _label_maps(val_gt)
    batches = _as_batches(val_gt, results, label_of)
    # Labels 6 and 30 have no category id (the slots a 91-logit COCO model must never emit):
    # added to the first image, they are dropped and reported, and the numbers are unchanged.
    strays = {"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]] * 3), "scores": torch.tensor([0.9, 0.8, 0.7]),
              "labels": torch.tensor([6, 30, 30])}  # fmt: skip
    clean = COCOMeanAveragePrecision(val_gt, category_of, backend="pycocotools")
    metric = COCOMeanAveragePrecision(val_gt, category_of, backend="pycocotools")
    for index, (ids, detections) in enumerate(batches):
        clean.update(ids, detections)
        if index == 0:
            detections = [{k: torch.cat([detections[0][k], strays[k]]) for k in strays}, *detections[1:]]
        metric.update(ids, detections)
    with pytest.warns(UserWarning, match=r"3 detections have labels without a COCO category id \[6, 30\]"):
        computed = metric.compute()
    assert metric.dropped_detections == 3 and metric.dropped_labels == [6, 30]
    assert computed["unscored_detections"].item() == 3
    expected = clean.compute()
    assert expected["unscored_detections"].item() == 0 and clean.dropped_detections == 0
    assert [computed[key].item() for key in SUMMARY_KEYS] == pytest.approx(
        [expected[key].item() for key in SUMMARY_KEYS], abs=1e-9
    )
    with pytest.warns(UserWarning, match="without a COCO category id"):
        _, rows = metric.results()
    assert set(rows[:, 6].astype(int).tolist()) <= set(category_of.values())
    # Without a label map, labels are category ids: unknown ones reach COCOeval and go unscored.
    identity = COCOMeanAveragePrecision(val_gt, backend="pycocotools")
    identity.update(batches[0][0][:1], [{"boxes": strays["boxes"], "scores": strays["scores"],
                                         "labels": torch.tensor([1, 2, 30])}])  # fmt: skip
    assert identity.compute()["unscored_detections"].item() == 2
