"""Count parameters and multiply-adds of a backbone or of a config's model, as a table or JSON.

    python tools/summary.py --backbone mobilenet_v2 --num-classes 1000 --input-size 224
    python tools/summary.py --config configs/ssdlite_mobilenetv2_coco.yaml --input-size 300 --json
    python tools/summary.py --config configs/deeplabv3_mobilenetv2_voc.yaml --input-size 513 --set network.aspp=full

Multiply-adds are counted by ``torch.utils.flop_counter`` (one multiply-add = 2 FLOPs) on one
image of ``input-size`` x ``input-size``, the convention of the paper's Tables 4, 6 and 7. A
config's network is built as ``tools/train.py`` builds it (``tasks.configs.instantiate_config``);
``--set KEY=VALUE`` (e.g. ``network.aspp=full``) is ``--model.KEY=VALUE`` on ``tools/train.py``'s
command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.startup import quiet_startup  # noqa: E402

if __name__ == "__main__":
    quiet_startup()  # before torch and Lightning are imported

from tasks.complexity import BackboneFeatures, MobileNetV2Classifier, count  # noqa: E402, F401


def model_from_config(path: Path, settings: Sequence[str] = ()) -> nn.Module:
    """The network a training config trains, with ``KEY=VALUE`` model settings (YAML values)."""
    from tasks.configs import instantiate_config

    for setting in settings:
        if not setting.partition("=")[0] or "=" not in setting:
            raise ValueError(f"--set {setting!r}: expected KEY=VALUE")
    task, _ = instantiate_config(path, [f"--model.{setting}" for setting in settings])
    return task.network


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
    try:
        main()
    except (FileNotFoundError, ValueError) as error:  # a missing or broken config, a bad --set: one line
        sys.exit(f"error: {error}")
