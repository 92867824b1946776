"""COCO box mAP: a plain function over COCO results and a ``torchmetrics.Metric`` for training.

:func:`evaluate_detections` runs the official COCO protocol (pycocotools' ``COCOeval``, or its
C++ re-implementation faster-coco-eval, which gives the same numbers) on a list of detections in
the COCO results format and returns the twelve summary numbers plus per-class AP. It is what
``tools/eval_coco.py`` and :class:`COCOMeanAveragePrecision` call.

:class:`COCOMeanAveragePrecision` collects detections batch by batch during validation. Its
states are lists reduced by concatenation, so under DDP ``compute()`` gathers the detections of
every rank and evaluates them together: the number equals a single-process run. The ground truth
(a loaded ``COCO`` object) and the label -> category-id map are given with
:meth:`~COCOMeanAveragePrecision.set_ground_truth` by whoever owns the data (the task takes them
from its DataModule), so the metric never opens a file.
"""

from __future__ import annotations

import contextlib
import io
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat, rank_zero_warn

Backend = Literal["auto", "pycocotools", "faster"]

# COCOeval.stats, in pycocotools' order (maxDets 1/10/100; areas small < 32^2 <= medium < 96^2).
SUMMARY_KEYS: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip

# A source id is rank * _RANK_STRIDE + the rank's running image count (see update()).
_RANK_STRIDE = 1 << 40
_faster_gt_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _resolve_backend(backend: Backend) -> Literal["pycocotools", "faster"]:
    if backend not in ("auto", "pycocotools", "faster"):
        raise ValueError(f"backend must be 'auto', 'pycocotools' or 'faster', got {backend!r}")
    if backend != "auto":
        return backend
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return "pycocotools"
    return "faster"


def load_coco(annotations: Any, backend: Backend = "pycocotools") -> Any:
    """A ``COCO`` object of ``backend``'s library from a path, a dataset dict or a ``COCO`` object.

    A ``COCO`` of the other library is converted through its ``dataset`` dict (the conversion is
    cached per object, so evaluating every epoch does not re-index the ground truth).
    """
    backend = _resolve_backend(backend)
    if backend == "faster":
        from faster_coco_eval import COCO as FasterCOCO

        if isinstance(annotations, FasterCOCO):
            return annotations
        if hasattr(annotations, "dataset"):
            try:
                return _faster_gt_cache[annotations]
            except (KeyError, TypeError):
                pass
            with contextlib.redirect_stdout(io.StringIO()):
                converted = FasterCOCO(annotations.dataset, use_deepcopy=True)
            with contextlib.suppress(TypeError):
                _faster_gt_cache[annotations] = converted
            return converted
        return FasterCOCO(_annotation_source(annotations), use_deepcopy=True)
    from pycocotools.coco import COCO

    if isinstance(annotations, COCO):
        return annotations
    source = annotations.dataset if hasattr(annotations, "dataset") else _annotation_source(annotations)
    coco = COCO()
    coco.dataset = _read_json(source) if isinstance(source, Path) else _copy_dataset(source)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _annotation_source(annotations: Any) -> Path | dict:
    if isinstance(annotations, (str, Path)):
        path = Path(annotations)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: COCO annotation file not found")
        return path
    if isinstance(annotations, Mapping):
        return dict(annotations)
    raise TypeError(f"expected a COCO object, a dataset dict or a path, got {type(annotations).__name__}")


def _read_json(path: Path) -> dict:
    import json

    with open(path) as handle:
        return json.load(handle)


def _copy_dataset(dataset: Mapping) -> dict:
    import copy

    return copy.deepcopy(dict(dataset))


def _results_as_dicts(results: Sequence[Mapping[str, Any]] | np.ndarray) -> list[dict[str, Any]]:
    """Fresh result dicts (COCO's loaders write ``id``/``area`` into them) with plain numbers."""
    if isinstance(results, np.ndarray):
        if results.ndim != 2 or results.shape[1] != 7:
            raise ValueError(
                "results array must be [D, 7] (image_id, x, y, w, h, score, category_id), "
                f"got {results.shape}"
            )
        return [
            {
                "image_id": int(row[0]),
                "bbox": [float(row[1]), float(row[2]), float(row[3]), float(row[4])],
                "score": float(row[5]),
                "category_id": int(row[6]),
            }
            for row in results
        ]
    return [
        {
            "image_id": int(r["image_id"]),
            "category_id": int(r["category_id"]),
            "bbox": [float(v) for v in r["bbox"]],
            "score": float(r["score"]),
        }
        for r in results
    ]


def evaluate_detections(
    coco_gt: Any,
    results: Sequence[Mapping[str, Any]] | np.ndarray,
    *,
    image_ids: Sequence[int] | None = None,
    backend: Backend = "auto",
    verbose: bool = False,
) -> dict[str, Any]:
    """COCO box mAP of ``results`` against ``coco_gt`` (the official ``COCOeval`` protocol).

    Args:
        coco_gt: ground truth: a pycocotools or faster-coco-eval ``COCO``, a dataset dict or the
            path of an ``instances_*.json``.
        results: detections in the COCO results format, ``{"image_id", "category_id", "bbox":
            [x, y, w, h] in original pixels, "score"}``, or a ``[D, 7]`` array of ``(image_id, x,
            y, w, h, score, category_id)`` rows. May be empty: the AP is then 0.
        image_ids: evaluate on these images only (``params.imgIds``); all ground-truth images
            when None.
        backend: ``"pycocotools"``, ``"faster"`` (faster-coco-eval) or ``"auto"`` (faster when
            installed). Both give the same numbers.
        verbose: print COCOeval's summary table.

    Returns:
        ``AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl`` as fractions (``-1``
        where COCOeval has nothing to measure, e.g. no small objects), ``per_class``: a dict
        ``{category_id: AP}`` (``-1`` for categories without ground truth), and
        ``unscored_detections`` / ``unscored_category_ids``: how many results name a category
        id that is not in the ground truth, and which ids. COCOeval evaluates the ground truth's
        categories only, so such results are never scored (pycocotools keeps and ignores them);
        they are left out before either backend runs, so both give pycocotools' numbers.

    Raises:
        ValueError: a result names an image that is not in the ground truth (pycocotools'
            ``loadRes`` refuses those too).
    """
    backend = _resolve_backend(backend)
    gt = load_coco(coco_gt, backend)
    detections = _results_as_dicts(results)
    unknown = {d["image_id"] for d in detections} - set(gt.getImgIds())
    if unknown:
        raise ValueError(f"results name image ids not in the ground truth: {sorted(unknown)[:8]}")
    category_ids = set(gt.getCatIds())
    unscored = [d["category_id"] for d in detections if d["category_id"] not in category_ids]
    if unscored:
        detections = [d for d in detections if d["category_id"] in category_ids]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if backend == "faster":
            from faster_coco_eval import COCOeval_faster

            dt = gt.loadRes(detections) if detections else _empty_results(gt, backend)
            evaluator = COCOeval_faster(gt, dt, "bbox", print_function=print if verbose else _silent)
        else:
            from pycocotools.cocoeval import COCOeval

            dt = gt.loadRes(detections) if detections else _empty_results(gt, backend)
            evaluator = COCOeval(gt, dt, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted({int(i) for i in image_ids})
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    if verbose:
        print(out.getvalue(), end="")
    stats = [float(v) for v in np.asarray(evaluator.stats)[: len(SUMMARY_KEYS)]]
    summary: dict[str, Any] = dict(zip(SUMMARY_KEYS, stats))
    # precision: [T iou thresholds, R recall points, K categories, A areas, M maxDets]; area "all",
    # maxDets 100; -1 marks categories without ground truth, as in COCOeval.summarize.
    precision = np.asarray(evaluator.eval["precision"])[:, :, :, 0, -1]
    per_class = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k]
        valid = values[values > -1]
        per_class[int(category_id)] = float(valid.mean()) if valid.size else -1.0
    summary["per_class"] = per_class
    summary["unscored_detections"] = len(unscored)
    summary["unscored_category_ids"] = sorted(set(unscored))
    return summary


def _silent(*_: Any, **__: Any) -> None:
    return None


def _empty_results(gt: Any, backend: str) -> Any:
    """A detections ``COCO`` with no annotations (pycocotools' ``loadRes`` rejects an empty list)."""
    if backend == "faster":
        from faster_coco_eval import COCO
    else:
        from pycocotools.coco import COCO
    dt = COCO()
    dt.dataset = {
        "images": list(gt.dataset.get("images", [])),
        "categories": list(gt.dataset.get("categories", [])),
        "annotations": [],
    }
    dt.createIndex()
    return dt


class COCOMeanAveragePrecision(Metric):
    """COCO box mAP over detections collected batch by batch, DDP-safe.

    ``update(image_ids, detections)`` takes one batch of :meth:`SSDLiteHead.postprocess`-style
    detections (absolute xyxy boxes in the *original* image, contiguous labels); ``compute()``
    converts them to the COCO results format (label -> category id, xyxy -> xywh) and calls
    :func:`evaluate_detections` on the images seen.

    Detections whose label has no category id in ``label_to_category_id`` cannot be written as
    COCO results: they are dropped, counted and reported (a warning naming the count and the
    labels; :attr:`dropped_detections` and :attr:`dropped_labels`), never a crash. ``compute()``
    adds ``unscored_detections``: those plus the results :func:`evaluate_detections` could not
    score (category ids not in the ground truth).

    DDP: states are concatenated across ranks. A ``DistributedSampler`` pads the last batches
    with repeated images, so every image's detections are kept from one source only (the first
    rank that reported it): the result equals a single-process evaluation.

    Args:
        coco_gt: the ground truth, or None to give it later with :meth:`set_ground_truth`.
        label_to_category_id: ``{label: COCO category id}``; identity when None (labels are
            already category ids).
        backend: see :func:`evaluate_detections`.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self,
        coco_gt: Any = None,
        label_to_category_id: Mapping[int, int] | None = None,
        *,
        backend: Backend = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.backend = _resolve_backend(backend)
        self.coco_gt = None
        self.label_to_category_id = _label_map(label_to_category_id)
        if coco_gt is not None:
            self.set_ground_truth(coco_gt, label_to_category_id)
        # Detections of the last results() whose label has no category id: how many, which labels.
        self.dropped_detections = 0
        self.dropped_labels: list[int] = []
        # image_id, source: one row per image passed to update().
        self.add_state("image_records", default=[], dist_reduce_fx="cat")
        # xyxy boxes and scores, and (image_id, label, source) of every detection.
        self.add_state("det_boxes", default=[], dist_reduce_fx="cat")
        self.add_state("det_scores", default=[], dist_reduce_fx="cat")
        self.add_state("det_meta", default=[], dist_reduce_fx="cat")
        self._seen = 0

    def set_ground_truth(self, coco_gt: Any, label_to_category_id: Mapping[int, int] | None = None) -> None:
        """Give the ground truth (``COCO``, dataset dict or path) and the label -> category-id map."""
        self.coco_gt = load_coco(coco_gt, self.backend)
        self.label_to_category_id = _label_map(label_to_category_id)

    def update(self, image_ids: Tensor | Sequence[int], detections: Sequence[Mapping[str, Tensor]]) -> None:
        """Add one batch.

        Args:
            image_ids: COCO image id of each image, Int64Tensor[N].
            detections: per image, ``boxes`` (FloatTensor[D, 4] absolute xyxy in the original
                image), ``scores`` (FloatTensor[D]) and ``labels`` (Int64Tensor[D]).
        """
        image_ids = torch.as_tensor(image_ids, dtype=torch.int64, device=self.device).reshape(-1)
        if len(image_ids) != len(detections):
            raise ValueError(f"got {len(image_ids)} image ids for {len(detections)} detection sets")
        rank = (
            torch.distributed.get_rank()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 0
        )
        sources = rank * _RANK_STRIDE + self._seen + torch.arange(len(image_ids), device=self.device)
        self._seen += len(image_ids)
        self.image_records.append(torch.stack([image_ids, sources], dim=1))
        for image_id, source, det in zip(image_ids, sources, detections):
            count = len(det["scores"])
            self.det_boxes.append(det["boxes"].detach().to(self.device, torch.float32).reshape(-1, 4))
            self.det_scores.append(det["scores"].detach().to(self.device, torch.float32).reshape(-1))
            meta = torch.stack(
                [
                    image_id.expand(count),
                    det["labels"].to(self.device, torch.int64).reshape(-1),
                    source.expand(count),
                ],
                dim=1,
            )
            self.det_meta.append(meta)

    def results(self) -> tuple[list[int], np.ndarray]:
        """The images seen and their detections as ``[D, 7]`` COCO result rows (de-duplicated).

        Rows are ``(image_id, x, y, w, h, score, category_id)``; detections whose label has no
        category id are left out and reported (see the class docstring).
        """
        self.dropped_detections, self.dropped_labels = 0, []
        if _is_empty(self.image_records):
            return [], np.zeros((0, 7))
        records = dim_zero_cat(self.image_records).cpu().numpy()
        # The first source that reported an image owns it (DistributedSampler repeats images).
        order = np.lexsort((records[:, 1], records[:, 0]))
        image_ids, first = np.unique(records[order, 0], return_index=True)
        owner = records[order[first], 1]
        if _is_empty(self.det_scores):
            return image_ids.tolist(), np.zeros((0, 7))
        boxes = dim_zero_cat(self.det_boxes).double().cpu().numpy()
        scores = dim_zero_cat(self.det_scores).double().cpu().numpy()
        meta = dim_zero_cat(self.det_meta).cpu().numpy()
        position = np.searchsorted(image_ids, meta[:, 0])
        keep = owner[position] == meta[:, 2]
        boxes, scores, meta = boxes[keep], scores[keep], meta[keep]
        labels = meta[:, 1]
        if self.label_to_category_id is not None:
            known = np.isin(labels, np.fromiter(self.label_to_category_id, dtype=np.int64))
            if not known.all():
                self.dropped_detections = int((~known).sum())
                self.dropped_labels = np.unique(labels[~known]).tolist()
                rank_zero_warn(
                    f"{self.dropped_detections} detections have labels without a COCO category id "
                    f"{self.dropped_labels} and are not scored (label_to_category_id maps "
                    f"{len(self.label_to_category_id)} labels)"
                )
                boxes, scores, meta, labels = boxes[known], scores[known], meta[known], labels[known]
            lookup = np.vectorize(self.label_to_category_id.__getitem__, otypes=[np.int64])
            category_ids = lookup(labels) if len(labels) else labels
        else:
            category_ids = labels
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        rows = np.concatenate([meta[:, :1], xywh, scores[:, None], category_ids[:, None]], axis=1)
        return image_ids.tolist(), rows

    def compute(self) -> dict[str, Tensor]:
        """The twelve COCO summary numbers (``AP``, ``AP50``, ... ``ARl``) as 0-d tensors, and
        ``unscored_detections`` (see the class docstring)."""
        if self.coco_gt is None:
            raise RuntimeError(
                "COCOMeanAveragePrecision has no ground truth: call set_ground_truth(coco_gt, "
                "label_to_category_id) first (the detection task does it from its DataModule)"
            )
        image_ids, rows = self.results()
        if not image_ids:
            return {key: torch.tensor(0.0) for key in (*SUMMARY_KEYS, "unscored_detections")}
        summary = evaluate_detections(self.coco_gt, rows, image_ids=image_ids, backend=self.backend)
        computed = {key: torch.tensor(summary[key], dtype=torch.float32) for key in SUMMARY_KEYS}
        unscored = self.dropped_detections + summary["unscored_detections"]
        computed["unscored_detections"] = torch.tensor(float(unscored))
        return computed

    def reset(self) -> None:
        super().reset()
        self._seen = 0


def _label_map(label_to_category_id: Mapping[int, int] | None) -> dict[int, int] | None:
    return None if label_to_category_id is None else {int(k): int(v) for k, v in label_to_category_id.items()}


def coco_results(rows: np.ndarray) -> list[dict[str, Any]]:
    """``[D, 7]`` rows of :meth:`COCOMeanAveragePrecision.results` as COCO results-format dicts
    (what a ``detections.json`` holds)."""
    return _results_as_dicts(rows)


def _is_empty(state: list[Tensor] | Tensor) -> bool:
    """True for a list state with no elements (before sync) or a tensor state of none (after)."""
    if isinstance(state, Tensor):
        return state.numel() == 0
    return sum(t.numel() for t in state) == 0
