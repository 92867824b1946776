"""Backbones that return named multi-stage feature maps with declared channels and strides."""

from backbones.base import Backbone, FeatureSpec
from backbones.mobilenetv2 import MobileNetV2

__all__ = ["Backbone", "FeatureSpec", "MobileNetV2"]
