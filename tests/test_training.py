"""tasks/training.py: the BatchNorm policy both tasks share, and the network recorded in hparams."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tasks.buildable import build
from tasks.detection import SSDLiteDetection
from tasks.networks import DeepLabV3MobileNetV2, SSDLite, SSDLiteMobileNetV2
from tasks.segmentation import DeepLabV3Segmentation


@pytest.mark.parametrize("make_task", [
    lambda: SSDLiteDetection(SSDLiteMobileNetV2(num_classes=3, width_mult=0.35), freeze_bn=True),
    lambda: DeepLabV3Segmentation(DeepLabV3MobileNetV2(num_classes=3, width_mult=0.35), freeze_bn=True),
])  # fmt: skip
def test_freeze_bn_keeps_every_batchnorm_of_the_network_in_eval(make_task) -> None:
    task = make_task().train()
    norms = [m for m in task.network.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not m.training for m in norms)
    assert all(not p.requires_grad for m in norms for p in m.parameters())
    convs = [m for m in task.network.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.weight.requires_grad for m in convs)
    before = [m.running_var.clone() for m in norms]
    outputs = task.network(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    next(iter(outputs.values())).float().sum().backward()
    assert all(torch.equal(b, m.running_var) for b, m in zip(before, norms))


def test_network_is_saved_as_its_config_and_rebuilt_from_it() -> None:
    network = SSDLiteMobileNetV2(num_classes=4, width_mult=0.35, image_size=160, score_threshold=0.2)
    task = SSDLiteDetection(network)
    saved = task.hparams["network"]
    assert saved["class_path"] == "tasks.networks.detector.SSDLiteMobileNetV2"
    assert saved["init_args"]["width_mult"] == 0.35 and saved["init_args"]["score_threshold"] == 0.2
    rebuilt = build(saved, SSDLite)
    assert rebuilt.image_size == 160 and rebuilt.head.score_threshold == 0.2
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in network.state_dict().items()}
    again = SSDLiteDetection(**{k: v for k, v in task.hparams.items() if not k.startswith("_")})
    # What load_from_checkpoint does without LightningCLI: the same network (jsonargparse fills
    # in the head's defaults that the Python call left implicit) and the same training options.
    given = saved["init_args"]
    assert {k: again.hparams["network"]["init_args"][k] for k in given} == given
    assert {k: v for k, v in again.hparams.items() if k != "network"} == {k: v for k, v in task.hparams.items() if k != "network"}


def test_readme_network_snippet_runs_without_lightning() -> None:
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    (snippet,) = re.findall(r"A network is usable without Lightning:\n\n```python\n(.*?)```", readme, re.S)
    check = "\nimport sys\nassert len(detections) == 2 and set(detections[0]) == {'boxes', 'scores', 'labels'}\n"
    check += "assert not [m for m in sys.modules if m.startswith(('lightning', 'pytorch_lightning'))]\n"
    result = subprocess.run([sys.executable, "-c", snippet + check], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
