"""Count parameters and multiply-adds of a backbone or of a config's model, as a table or JSON.

    python tools/summary.py --backbone mobilenet_v2 --num-classes 1000 --input-size 224
    python tools/summary.py --config configs/ssdlite_mobilenetv2_coco.yaml --input-size 300 --json
    python tools/summary.py --config configs/deeplabv3_mobilenetv2_voc.yaml --input-size 513 --set aspp=full

Multiply-adds are counted by ``torch.utils.flop_counter`` (one multiply-add = 2 FLOPs) on one
image of ``input-size`` x ``input-size``, the convention of the paper's Tables 4, 6 and 7.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from backbones.mobilenetv2 import MobileNetV2  # noqa: E402
from tasks.complexity import count  # noqa: E402


class MobileNetV2Classifier(nn.Module):
    """The paper's ImageNet network: MobileNetV2 features, global average pool, linear to K."""

    def __init__(self, num_classes: int, width_mult: float = 1.0) -> None:
        super().__init__()
        self.backbone = MobileNetV2(width_mult=width_mult, out_features=("final_conv",))
        channels = self.backbone.output_shape()["final_conv"].channels
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(channels, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)["final_conv"]
        return self.classifier(features.mean(dim=(2, 3)))


class BackboneFeatures(nn.Module):
    """A backbone with every output it can tap, for counting the feature extractor alone."""

    def __init__(self, width_mult: float = 1.0) -> None:
        super().__init__()
        self.backbone = MobileNetV2(width_mult=width_mult, out_features=("final_conv",))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.backbone(images)


def model_from_config(path: Path, overrides: Sequence[str] = ()) -> nn.Module:
    """Build the network of a training config: its LightningModule's ``model`` attribute.

    ``overrides`` are ``KEY=VALUE`` strings for the model's ``init_args`` (YAML values), e.g.
    ``aspp=full``.
    """
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningModule

    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"{path}: no 'model' section (expected a LightningCLI config)")
    model_config = config["model"]
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {override!r}: expected KEY=VALUE")
        model_config.setdefault("init_args", {})[key] = yaml.safe_load(value)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningModule, "model")
    parsed = parser.parse_object({"model": model_config})
    task = parser.instantiate(parsed).model
    if not isinstance(getattr(task, "model", None), nn.Module):
        raise ValueError(f"{path}: {type(task).__name__} has no 'model' network attribute to count")
    return task.model


def format_table(summary: dict[str, object]) -> str:
    """A fixed-width table: one row per top-level part, then the total."""
    rows = [(part["name"], part["params"], part["madds"]) for part in summary["parts"]]
    rows.append(("total", summary["params"], summary["madds"]))
    width = max(len(name) for name, _, _ in rows) + 2
    lines = [
        f"{summary['model']} at {summary['input_size']}x{summary['input_size']}",
        f"{'part':<{width}}{'params':>14}{'mult-adds':>18}",
    ]
    for name, params, madds in rows:
        lines.append(f"{name:<{width}}{params / 1e6:>13.3f}M{madds / 1e9:>17.3f}B")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--backbone", choices=["mobilenet_v2"], help="count the feature extractor")
    source.add_argument("--config", type=Path, help="count the model of a LightningCLI config")
    parser.add_argument("--width-mult", type=float, default=1.0, help="backbone width multiplier")
    parser.add_argument("--input-size", type=int, default=224, help="square input side in pixels")
    parser.add_argument(
        "--num-classes", type=int, help="with --backbone: add the paper's classifier (pool + linear to K)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="with --config: override a model init arg"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.set and args.config is None:
        parser.error("--set goes with --config")
    if args.config is not None and (args.num_classes is not None or args.width_mult != 1.0):
        parser.error("--num-classes and --width-mult go with --backbone; set them in the config instead")
    if args.input_size < 32:
        parser.error(f"--input-size must be at least 32, got {args.input_size}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    if args.config is not None:
        model = model_from_config(args.config, args.set)
    elif args.num_classes is not None:
        model = MobileNetV2Classifier(args.num_classes, args.width_mult)
    else:
        model = BackboneFeatures(args.width_mult)
    summary = count(model, args.input_size)
    print(json.dumps(summary) if args.json else format_table(summary))
    return summary


if __name__ == "__main__":
    main()
