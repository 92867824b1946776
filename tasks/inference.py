"""One inference path for both tasks: a checkpoint -> network, preprocessing, class names -> predictions.

Validation, ``tools/test.py`` and ``tools/predict.py`` run the same steps on an image, so the
same checkpoint gives the same detections and masks through each of them:

1. read the file as RGB ``uint8[H, W, 3]`` (:func:`tasks.data.files.read_rgb`: grey, CMYK, RGBA
   converted as the DataModules do);
2. the DataModule's evaluation transform (detection: ``detection_eval_transform``, the fixed
   SSD resize to the network's ``image_size``; segmentation: none, full resolution);
3. the task's own ``predict_step``: the network (which normalises the pixels itself), then the
   post-processing back to the original image's pixels.

The tasks implement steps 2-3 in ``predict_images`` (each next to its ``predict_step``); this
module opens checkpoints and files and draws pictures around them.

    predictor = Predictor.from_checkpoint("runs/.../last.ckpt")
    prediction = predictor("street.jpg")       # {"boxes", "scores", "labels"} or {"labels"}
    predictor.draw("street.jpg", prediction).save("street.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from PIL import Image
from torch import Tensor

from tasks.checkpoints import load_task
from tasks.data.files import read_rgb
from tasks.drawing import draw_detections, draw_segmentation

# Segmentation runs at full resolution: an 8000x8000 photo would need gigabytes of activations.
# Larger inputs are segmented at this longest side and their label maps resized back.
DEFAULT_MAX_SIZE = 2048


class Predictor:
    """A trained task, ready to predict on image files or RGB arrays.

    Args:
        task: a detection or segmentation LightningModule with ``predict_images`` (both of this
            project's tasks), in eval mode.
        max_size: segmentation only: longest side at which an image is segmented (larger images
            are scaled down for the network and the label map scaled back); None for no limit.
    """

    def __init__(self, task: LightningModule, *, max_size: int | None = DEFAULT_MAX_SIZE) -> None:
        if max_size is not None and max_size < 32:
            raise ValueError(f"max_size must be at least 32 pixels, got {max_size}")
        self.task = task.eval()
        self.max_size = max_size

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs: Any) -> Predictor:
        """Load a checkpoint written by ``tools/train.py`` (safely: no code runs from the file)."""
        return cls(load_task(path), **kwargs)

    @property
    def class_names(self) -> list[str]:
        """Names by label (index 0 is the background)."""
        return self.task.label_names()

    @torch.no_grad()
    def predict(self, images: Sequence[np.ndarray]) -> list[dict[str, Tensor]]:
        """Predictions for RGB ``uint8[H, W, 3]`` arrays, in their own pixels.

        Returns:
            Per image, detection: ``boxes`` (FloatTensor[D, 4] absolute xyxy), ``scores``,
            ``labels``; segmentation: ``labels`` (Int64Tensor[H, W]) and ``inference_size``
            ``(h, w)``, the size the network saw (smaller than the image when ``max_size`` capped it).
        """
        return self.task.predict_images(list(images), max_size=self.max_size)

    def __call__(self, image: str | Path | np.ndarray) -> dict[str, Tensor]:
        """The prediction for one image file or RGB array."""
        return self.predict([read_rgb(image) if isinstance(image, (str, Path)) else image])[0]

    def draw(
        self, image: str | Path | np.ndarray, prediction: dict[str, Any], *, score_threshold: float = 0.3
    ) -> Image.Image:
        """A picture of ``prediction``: boxes with "name score" tags, or a colour mask with a legend."""
        array = read_rgb(image) if isinstance(image, (str, Path)) else image
        picture = Image.fromarray(array)
        if "boxes" in prediction:  # the detection contract (see predict)
            return draw_detections(
                picture,
                prediction["boxes"].numpy(),
                prediction["labels"].tolist(),
                prediction["scores"].tolist(),
                self.class_names,
                score_threshold=score_threshold,
            )
        return draw_segmentation(picture, prediction["labels"].numpy(), self.class_names)


def detections_as_coco_results(
    image_id: int | str, prediction: dict[str, Tensor], label_to_category_id: dict[int, int] | None
) -> list[dict[str, Any]]:
    """One image's detections in the COCO results format (``bbox`` as xywh pixels).

    Labels without a category id (``label_to_category_id`` given and missing the label) are left
    out: COCO scores only categories of its ground truth.
    """
    rows = []
    for box, score, label in zip(
        prediction["boxes"].tolist(), prediction["scores"].tolist(), prediction["labels"].tolist()
    ):
        category = label if label_to_category_id is None else label_to_category_id.get(int(label))
        if category is None:
            continue
        x1, y1, x2, y2 = box
        rows.append(
            {"image_id": image_id, "category_id": int(category), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
        )
    return rows
