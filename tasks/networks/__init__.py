"""The networks, as plain ``nn.Module``s that import no Lightning: RGB pixels (0..255) in,
predictions out; each owns its loss and post-processing.

* :class:`SSDLiteMobileNetV2` (:mod:`tasks.networks.detector`): the paper's detector.
* :class:`DeepLabV3MobileNetV2` (:mod:`tasks.networks.segmenter`): the paper's segmenter.
"""

from tasks.networks.detector import SSDLite, SSDLiteMobileNetV2
from tasks.networks.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize
from tasks.networks.segmenter import DeepLabV3MobileNetV2, Segmenter, segment_probs
from tasks.networks.torchvision_detectors import MobileNetV3LargeFeatures, SSDLiteMobileNetV3, TorchvisionSSDLite
from tasks.networks.torchvision_segmenters import TorchvisionLRASPP

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DeepLabV3MobileNetV2",
    "MobileNetV3LargeFeatures",
    "Normalize",
    "SSDLite",
    "SSDLiteMobileNetV2",
    "SSDLiteMobileNetV3",
    "Segmenter",
    "TorchvisionSSDLite",
    "TorchvisionLRASPP",
    "segment_probs",
]
