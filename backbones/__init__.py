"""Backbones that return named multi-stage feature maps with declared channels and strides."""

from backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, FeatureSpec
from backbones.mobilenetv2 import MobileNetV2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Backbone", "FeatureSpec", "MobileNetV2"]
