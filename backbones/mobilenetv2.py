"""MobileNetV2 (Sandler et al., 2018, section 4, Tables 1-2) as a multi-output backbone.

The network is the paper's: a 3x3 stem conv (32 channels, stride 2), 17 inverted-residual
blocks built from the (t, c, n, s) table, and a final 1x1 conv to 1280 channels. Each block is
1x1 expansion + ReLU6, 3x3 depthwise + ReLU6, and a *linear* 1x1 projection (section 3.2: no
non-linearity in the narrow layer), with a residual connection only when the block keeps both
resolution and width.

For dense prediction the later strides can be traded for dilation (output stride 16 or 8,
DeepLab style), and the backbone returns named maps whose channels and strides it declares at
construction, so heads never copy channel counts by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from backbones.base import Backbone, FeatureSpec
from backbones.layers import ConvBNAct

# Table 2: expansion factor t, output channels c, repeats n, stride s of the first repeat.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
FINAL_CHANNELS = 1280

# Every output the backbone can return, in the order forward produces them.
#   c1..c5      the end of the last block at each resolution (strides 2, 4, 8, 16, 32 at OS 32)
#   c4_expand   the 1x1 expansion output of the first stride-16->32 block (TF's
#               ``layer_15/expansion_output``, 576 channels at width 1.0): SSDLite's first tap
#   final_conv  the final 1x1 conv to 1280 channels (the last layer of the base network)
OUTPUT_NAMES: tuple[str, ...] = ("c1", "c2", "c3", "c4", "c4_expand", "c5", "final_conv")
DEFAULT_OUTPUTS: tuple[str, ...] = ("c1", "c2", "c3", "c4", "c5")

# Index (into the 17 blocks) of the block whose *output* each stage name taps.
_STAGE_END_BLOCK = {"c1": 0, "c2": 2, "c3": 5, "c4": 12, "c5": 16}
# Index of the block whose *expansion* c4_expand taps: the first block of the (6, 160, 3, 2) row.
_EXPANSION_TAP_BLOCK = 13
_NUM_BLOCKS = sum(n for _, _, n, _ in INVERTED_RESIDUAL_SETTING)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to the nearest multiple of ``divisor`` without losing over 10%.

    This is the rounding of the reference implementations (TF slim, torchvision), so width
    multipliers give the same layer widths as their published checkpoints.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class InvertedResidual(nn.Module):
    """The bottleneck block of Table 1: expand (1x1) -> depthwise (3x3) -> linear project (1x1)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int,
        expand_ratio: int,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        # t = 1 (the first block) has no expansion layer, as in the paper and the reference code.
        self.expand = ConvBNAct(in_channels, hidden, 1) if expand_ratio != 1 else None
        self.depthwise = ConvBNAct(
            hidden, hidden, 3, stride=stride, dilation=dilation, groups=hidden
        )
        self.project = ConvBNAct(hidden, out_channels, 1, activation=None)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expanded_channels = hidden

    def forward_with_expansion(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return the block output and the output of its expansion layer."""
        expanded = self.expand(x) if self.expand is not None else x
        out = self.project(self.depthwise(expanded))
        if self.use_residual:
            out = out + x
        return out, expanded

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_expansion(x)[0]


class MobileNetV2(Backbone):
    """MobileNetV2 feature extractor returning named maps (``c1``..``c5``, ``c4_expand``, ``final_conv``).

    Args:
        width_mult: the paper's width multiplier; layer widths are rounded to multiples of 8 and
            the final 1280 conv is not reduced for multipliers below 1 (section 6.1).
        output_stride: 32, 16 or 8. Strides beyond it become dilation in the later blocks
            (DeepLab style: the block that would subsample keeps the current rate, later blocks
            use the multiplied one, as TF's ``mobilenet.py``), so the same weights give finer maps.
        out_features: which outputs ``forward`` returns, any of :data:`OUTPUT_NAMES`. Layers after
            the last requested output are not built (e.g. Mobile DeepLabv3's "MNet V2*" has no
            1280 conv), so they cost neither parameters nor time.
        weights: ``None`` (random init), ``"imagenet"`` (torchvision's ``MobileNet_V2_Weights``,
            width 1.0 only) or a path to a state dict in torchvision's or this module's format.
        frozen_stages: freeze the first N rows of Table 2 (0 = stem conv, 1..7 = the bottleneck
            rows, 8 = final conv): no gradients and BatchNorm kept in eval mode.

    Freezing every BatchNorm (small-batch fine-tuning) is the training task's policy
    (``freeze_bn`` of :class:`tasks.training.DenseTask`), not the backbone's.
    """

    def __init__(
        self,
        *,
        width_mult: float = 1.0,
        output_stride: int = 32,
        out_features: Sequence[str] = DEFAULT_OUTPUTS,
        weights: str | None = None,
        frozen_stages: int = 0,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        unknown = [name for name in out_features if name not in OUTPUT_NAMES]
        if unknown or not out_features:
            raise ValueError(
                f"out_features {list(out_features)} must be a non-empty subset of {list(OUTPUT_NAMES)}"
            )
        if not 0 <= frozen_stages <= len(INVERTED_RESIDUAL_SETTING) + 2:
            raise ValueError(f"frozen_stages must be in 0..9, got {frozen_stages}")
        self.width_mult = width_mult
        self.output_stride = output_stride
        self.out_features = tuple(name for name in OUTPUT_NAMES if name in out_features)
        self.frozen_stages = frozen_stages

        last_block = _last_block_needed(self.out_features)
        stem_channels = make_divisible(STEM_CHANNELS * width_mult)
        self.stem = ConvBNAct(3, stem_channels, 3, stride=2)
        declared: dict[str, FeatureSpec] = {}
        self._stage_of_block: list[int] = []
        blocks: list[InvertedResidual] = []
        in_channels, current_stride, dilation = stem_channels, 2, 1
        for row, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTING, start=1):
            out_channels = make_divisible(c * width_mult)
            for repeat in range(n):
                index = len(blocks)
                if index > last_block:
                    break
                stride = s if repeat == 0 else 1
                block_dilation = dilation
                if current_stride * stride > output_stride:
                    dilation *= stride  # trade the stride for dilation in the blocks after
                    stride = 1
                block = InvertedResidual(
                    in_channels, out_channels, stride=stride, expand_ratio=t, dilation=block_dilation
                )
                if index == _EXPANSION_TAP_BLOCK:
                    # The expansion runs before the depthwise conv subsamples: previous stride.
                    declared["c4_expand"] = FeatureSpec(block.expanded_channels, current_stride)
                current_stride *= stride
                for name, end in _STAGE_END_BLOCK.items():
                    if end == index:
                        declared[name] = FeatureSpec(out_channels, current_stride)
                blocks.append(block)
                self._stage_of_block.append(row)
                in_channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        if "final_conv" in self.out_features:
            final_channels = make_divisible(FINAL_CHANNELS * max(1.0, width_mult))
            self.final_conv: ConvBNAct | None = ConvBNAct(in_channels, final_channels, 1)
            declared["final_conv"] = FeatureSpec(final_channels, current_stride)
        else:
            self.final_conv = None
        self._output_shape = {name: declared[name] for name in self.out_features}

        self._init_weights()
        if weights is not None:
            self.load_weights(weights)
        self._apply_freezing()

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Return ``{name: Tensor[N, C, ceil(H / stride), ceil(W / stride)]}`` for ``out_features``."""
        wanted = set(self.out_features)
        outputs: dict[str, Tensor] = {}
        x = self.stem(images)
        for index, block in enumerate(self.blocks):
            if index == _EXPANSION_TAP_BLOCK and "c4_expand" in wanted:
                x, outputs["c4_expand"] = block.forward_with_expansion(x)
            else:
                x = block(x)
            for name, end in _STAGE_END_BLOCK.items():
                if end == index and name in wanted:
                    outputs[name] = x
        if self.final_conv is not None:
            outputs["final_conv"] = self.final_conv(x)
        return {name: outputs[name] for name in self.out_features}

    # ------------------------------------------------------------------ weights
    def _init_weights(self) -> None:
        """Kaiming-normal convs and unit BatchNorm, the reference implementations' init."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def load_weights(self, weights: str | Path) -> None:
        """Load ``"imagenet"`` (torchvision's weights) or a state dict file, checking every key."""
        if str(weights) == "imagenet":
            if self.width_mult != 1.0:
                raise ValueError(
                    f"weights='imagenet' exists only for width_mult=1.0, got {self.width_mult}; "
                    "pass a state dict path for other widths"
                )
            state_dict = imagenet_state_dict()
            source = "torchvision MobileNet_V2_Weights.IMAGENET1K_V1"
        else:
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: weights file not found")
            try:
                state_dict = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # torch raises several types for corrupt files
                raise ValueError(f"{path}: not a readable PyTorch state dict ({error})") from error
            if isinstance(state_dict, Mapping) and "state_dict" in state_dict:
                state_dict = state_dict["state_dict"]  # a Lightning or training checkpoint
            source = str(path)
        self.load_state_dict(convert_torchvision_state_dict(state_dict, self, source=source))

    # ------------------------------------------------------------------ freezing
    def _frozen_modules(self) -> Iterable[nn.Module]:
        if self.frozen_stages >= 1:
            yield self.stem
        for block, row in zip(self.blocks, self._stage_of_block):
            if row < self.frozen_stages:
                yield block
        if self.final_conv is not None and self.frozen_stages > len(INVERTED_RESIDUAL_SETTING) + 1:
            yield self.final_conv

    def _apply_freezing(self) -> None:
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> MobileNetV2:
        """Switch mode, keeping frozen stages in eval mode."""
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
        return self


class WeightsUnavailableError(RuntimeError):
    """The ImageNet weights are neither in torchvision's cache nor downloadable (e.g. offline)."""


def imagenet_state_dict() -> dict[str, Tensor]:
    """torchvision's ``MobileNet_V2_Weights.IMAGENET1K_V1`` state dict: from torch.hub's cache, else
    downloaded there (``weights_only=True``: a weight file never runs code).

    Raises:
        WeightsUnavailableError: one line saying where the file must be copied for offline use,
            and how to train without it or from a local file.
    """
    from torchvision.models import MobileNet_V2_Weights

    url = MobileNet_V2_Weights.IMAGENET1K_V1.url
    try:
        return MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=True, weights_only=True)
    except OSError as error:  # URLError, socket and DNS failures are all OSErrors
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        reason = getattr(error, "reason", None) or error
        raise WeightsUnavailableError(
            f"could not download the ImageNet backbone weights from {url} ({reason}); copy that file "
            f"to {cache} (torchvision's cache), or pass a local state dict with "
            "--model.weights_backbone PATH, or train from scratch with --model.weights_backbone null"
        ) from error


def _last_block_needed(out_features: Sequence[str]) -> int:
    """Index of the last block the requested outputs depend on (all blocks for ``final_conv``)."""
    last = 0
    for name in out_features:
        if name == "final_conv":
            last = _NUM_BLOCKS - 1
        elif name == "c4_expand":
            last = max(last, _EXPANSION_TAP_BLOCK)
        else:
            last = max(last, _STAGE_END_BLOCK[name])
    return last


def _torchvision_name(our_key: str, blocks: nn.ModuleList) -> str:
    """The key of ``torchvision.models.mobilenet_v2().state_dict()`` holding our parameter ``our_key``.

    torchvision numbers layers inside ``features`` (0 = stem, 1..17 = blocks, 18 = final conv)
    and inside each block's ``conv`` Sequential; we name them (``expand``, ``depthwise``,
    ``project``) so code reads as the paper does. ``conv``/``bn`` map to indices 0/1.
    """
    parts = our_key.split(".")
    sub = {"conv": "0", "bn": "1"}
    if parts[0] == "stem":
        return ".".join(["features", "0", sub[parts[1]], *parts[2:]])
    if parts[0] == "final_conv":
        return ".".join(["features", str(_NUM_BLOCKS + 1), sub[parts[1]], *parts[2:]])
    index, layer, kind, rest = int(parts[1]), parts[2], parts[3], parts[4:]
    has_expand = blocks[index].expand is not None
    # torchvision: [expand ConvBNReLU], depthwise ConvBNReLU, project Conv2d, project BatchNorm2d.
    position = {"expand": 0, "depthwise": 1 if has_expand else 0}.get(layer)
    if position is not None:
        torch_layer = [str(position), sub[kind]]
    else:
        first_project = 2 if has_expand else 1
        torch_layer = [str(first_project + (kind == "bn"))]
    return ".".join(["features", str(index + 1), "conv", *torch_layer, *rest])


def convert_torchvision_state_dict(
    state_dict: Mapping[str, Tensor], model: MobileNetV2, *, source: str = "state dict"
) -> dict[str, Tensor]:
    """Map a torchvision ``mobilenet_v2`` state dict (or one of ours) onto ``model``'s keys.

    Keys of layers ``model`` does not build (the classifier, layers after its last output) are
    dropped; a missing key, an unknown key or a shape mismatch raises a ``ValueError`` naming them.
    """
    ours = model.state_dict()
    if all(key in state_dict for key in ours):  # already in this module's format
        renamed = {key: state_dict[key] for key in ours}
        used = set(ours)
    else:
        wanted = {key: _torchvision_name(key, model.blocks) for key in ours}
        missing = [tv for tv in wanted.values() if tv not in state_dict]
        if missing:
            raise ValueError(f"{source}: missing keys for MobileNetV2: {_preview(missing)}")
        renamed = {key: state_dict[tv] for key, tv in wanted.items()}
        used = set(wanted.values())
    known_prefixes = ("features.", "classifier.", *(f"{name}." for name, _ in model.named_children()))
    unexpected = [key for key in state_dict if key not in used and not key.startswith(known_prefixes)]
    if unexpected:
        raise ValueError(f"{source}: unexpected keys for MobileNetV2: {_preview(unexpected)}")
    mismatched = [
        f"{key} {tuple(renamed[key].shape)} vs {tuple(value.shape)}"
        for key, value in ours.items()
        if renamed[key].shape != value.shape
    ]
    if mismatched:
        raise ValueError(
            f"{source}: shape mismatch (checkpoint vs model; wrong width_mult?): {_preview(mismatched)}"
        )
    return renamed


def _preview(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... ({len(items)} in all)" if len(items) > limit else "")
