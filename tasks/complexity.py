"""Parameters and multiply-adds of a network, counted as the MobileNetV2 paper counts them.

Multiply-adds come from ``torch.utils.flop_counter`` (one multiply-add = 2 FLOPs) on one image of
``input_size`` x ``input_size``, the convention of the paper's Tables 4, 6 and 7. Used by
``tools/summary.py`` and ``tools/benchmark.py``, so their tables give the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count(model: nn.Module, input_size: int) -> dict[str, object]:
    """Parameters and multiply-adds of ``model`` on one ``input_size``-square image, per part."""
    model.eval()
    with FlopCounterMode(display=False, depth=2) as counter, torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    flops = counter.get_flop_counts()
    root = type(model).__name__
    parts = []
    for name, child in model.named_children():
        child_flops = sum(flops.get(f"{root}.{name}", {}).values())
        parts.append(
            {
                "name": name,
                "params": sum(p.numel() for p in child.parameters()),
                "madds": int(child_flops // 2),
            }
        )
    return {
        "model": root,
        "input_size": input_size,
        "params": sum(p.numel() for p in model.parameters()),
        "madds": int(counter.get_total_flops() // 2),
        "parts": parts,
    }
