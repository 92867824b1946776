"""Evaluation cost: COCO mAP per backend on a COCO-sized result file, and mIoU accumulation."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch


def bench_eval(num_images: int = 5000, detections_per_image: int = 100, masks: int = 1000) -> list[dict[str, Any]]:
    """Seconds of COCO evaluation (``num_images`` x ``detections_per_image``, random boxes near
    7 objects per image) with each backend, and of mIoU over ``masks`` masks of 513x513."""
    from tasks.evaluation.coco_map import evaluate_detections
    from tasks.evaluation.miou import MeanIoU

    rng = np.random.default_rng(0)
    categories = [{"id": i, "name": f"class{i}"} for i in (1, 3, 7, 12, 44)]
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        boxes = np.concatenate([rng.uniform(0, 400, (7, 2)), rng.uniform(8, 200, (7, 2))], axis=1)
        for box in boxes:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(rng.choice([1, 3, 7, 12, 44])),
                "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": 0,
            })  # fmt: skip
        noisy = np.repeat(boxes, int(np.ceil(detections_per_image / len(boxes))), axis=0)[:detections_per_image]
        noisy = noisy + rng.normal(0, 6, noisy.shape)
        noisy[:, 2:] = np.abs(noisy[:, 2:]) + 1
        for box, score in zip(noisy, rng.random(detections_per_image)):
            category = int(rng.choice([1, 3, 7, 12, 44]))
            results.append({"image_id": image_id, "category_id": category, "bbox": box.tolist(), "score": float(score)})
    gt = {"images": images, "annotations": annotations, "categories": categories}
    rows = []
    for backend in ("pycocotools", "faster"):
        start = time.perf_counter()
        summary = evaluate_detections(gt, results, backend=backend)
        seconds = time.perf_counter() - start
        rows.append({"what": f"COCO eval {num_images}x{detections_per_image} ({backend})", "seconds": seconds, "AP": summary["AP"]})
    metric = MeanIoU(21)
    target = torch.from_numpy(rng.integers(0, 21, (masks, 513, 513), dtype=np.int64))
    prediction = torch.from_numpy(rng.integers(0, 21, (masks, 513, 513), dtype=np.int64))
    start = time.perf_counter()
    for index in range(masks):
        metric.update(prediction[index], target[index])
    metric.compute()
    rows.append({"what": f"mIoU accumulation {masks} masks 513x513", "seconds": time.perf_counter() - start})
    return rows
