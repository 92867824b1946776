"""What every DataModule of this project tells the task it feeds: one description, one batch format.

Batches (both tasks) are dicts:

* ``images``: ``uint8[N, 3, H, W]`` RGB, 0..255 and not normalised: the networks normalise
  (:mod:`tasks.networks`), so a loader, ``tools/predict.py`` and an exported model all feed
  the same pixels.
* ``image_sizes``: ``int64[N, 2]`` ``(height, width)`` of the frame predictions are reported
  in: the original image for detection, the unpadded image for segmentation.
* ``image_ids``: a list (COCO image ids, or image stems for VOC).
* detection: ``targets``, per image ``boxes`` (``float[M, 4]`` absolute xyxy in the network
  input), ``labels`` (``int64[M]``, ``1..K``) and ``crowd_boxes``; segmentation: ``masks``
  (``int64[N, H, W]``, ``255`` = ignore).

After ``setup`` a DataModule describes its data with :meth:`dataset_info` (see
:class:`DatasetInfo`); the task reads that one object instead of the DataModule's internals.

Both DataModules derive from :class:`tasks.data.sampling.DenseDataModule`, so they also share
their loader options (``batch_size``, ``eval_batch_size``, ``num_workers``, ``pin_memory``,
``persistent_workers``, ``prefetch_factor``), the worker seeding
(:func:`tasks.data.sampling.seed_worker`) and DDP evaluation sampling that scores every image
once (Lightning's ``UnrepeatedDistributedSampler``: ranks may run one batch fewer, so
evaluation steps must not need collectives).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset as a task needs to know it.

    Attributes:
        num_classes: labels the data uses, background (0) included: ``max label + 1``.
        class_names: ``{label: name}``; the background's name included when it has one.
        label_to_category_id: ``{label: COCO category id}`` for COCO-format data, else None.
        image_size: the square network input side the data is resized to (detection), or None
            (segmentation: full-resolution evaluation).
        coco_ground_truth: ``{"val": COCO, "test": COCO}`` annotations for COCO mAP, the splits
            that are set up.
    """

    num_classes: int
    class_names: Mapping[int, str]
    label_to_category_id: Mapping[int, int] | None = None
    image_size: int | None = None
    coco_ground_truth: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class DescribesData(Protocol):
    """A DataModule that can say what its data is (after ``setup``)."""

    def dataset_info(self) -> DatasetInfo: ...
