"""tools/summary.py and tasks.configs: parameter and multiply-add counts against the paper and torchvision,
and a config's network built the one way tools/train.py builds it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torchvision

from tasks.complexity import BackboneFeatures, MobileNetV2Classifier, count
from tasks.configs import instantiate_config
from tools import summary

ROOT = Path(__file__).resolve().parents[1]


def run_summary(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "summary.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_paper_classifier_counts_from_the_command_line() -> None:
    result = run_summary("--backbone", "mobilenet_v2", "--num-classes", "1000", "--input-size", "224", "--json")
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    # Paper: 3.4M parameters, 300M multiply-adds; torchvision: 3.50M, 300.8M.
    assert 3.4e6 <= counts["params"] <= 3.55e6
    assert abs(counts["madds"] - 300e6) <= 0.02 * 300e6
    reference = torchvision.models.mobilenet_v2()
    assert counts["params"] == sum(p.numel() for p in reference.parameters())


def test_counts_span_the_papers_range_over_width_and_resolution() -> None:
    counts = {
        (width, size): count(MobileNetV2Classifier(1000, width), size)
        for width in (0.35, 1.4)
        for size in (96, 224)
    }
    smallest, largest = counts[(0.35, 96)], counts[(1.4, 224)]
    assert 1.6e6 <= smallest["params"] <= 1.8e6  # paper: 1.7M
    assert 5.9e6 <= largest["params"] <= 6.9e6  # paper 6.9M; TF's released 1.4 model: 6.06M
    assert 570e6 <= largest["madds"] <= 600e6  # paper: 585M (TF release: 582M)
    assert smallest["madds"] < 15e6 < counts[(0.35, 224)]["madds"] < largest["madds"]


def test_backbone_alone_has_no_classifier_and_table_output() -> None:
    result = run_summary("--backbone", "mobilenet_v2", "--input-size", "224")
    assert result.returncode == 0, result.stderr
    assert "total" in result.stdout and "2.224M" in result.stdout
    assert count(BackboneFeatures(), 224)["params"] == 2_223_872


def test_multiply_adds_scale_with_resolution() -> None:
    model = MobileNetV2Classifier(10)
    small, large = count(model, 128)["madds"], count(model, 256)["madds"]
    assert 3.9 < large / small < 4.1  # convolutions cost grows with the pixel count


def test_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_summary("--config", "no/such/config.yaml")
    assert result.returncode == 1 and result.stderr.strip() == "error: no/such/config.yaml: config file not found"
    with pytest.raises(SystemExit):
        summary.parse_args(["--backbone", "mobilenet_v2", "--input-size", "8"])
    assert "--input-size must be at least 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        summary.parse_args(["--backbone", "resnet50"])


def test_paper_detector_from_its_config() -> None:
    # Table 6, "MNet V2 + SSDLite": 4.3M parameters, 0.8B multiply-adds at 300x300.
    result = run_summary("--config", "configs/ssdlite_mobilenetv2_coco.yaml", "--input-size", "300", "--json")
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    assert abs(counts["params"] - 4.3e6) <= 0.1 * 4.3e6
    assert abs(counts["madds"] - 0.8e9) <= 0.1 * 0.8e9


def test_paper_segmenter_from_its_config_and_full_aspp_costs_more() -> None:
    # Table 7, "MNet V2*, OS 16, no ASPP": 2.11M parameters, 2.75B multiply-adds at 512x512.
    config = Path("configs/deeplabv3_mobilenetv2_voc.yaml")
    lite = count(summary.model_from_config(config), 513)
    assert abs(lite["params"] - 2.11e6) <= 0.1 * 2.11e6
    assert abs(lite["madds"] - 2.75e9) <= 0.1 * 2.75e9
    full = count(summary.model_from_config(config, ["network.aspp=full"]), 513)
    assert full["params"] == 4_523_541  # the config's comment: full ASPP, 4,523,541 parameters
    assert full["params"] > 2 * lite["params"] and full["madds"] > 1.5 * lite["madds"]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        summary.model_from_config(config, ["network.aspp"])
    with pytest.raises(ValueError, match=r"deeplabv3_mobilenetv2_voc.yaml with --model.network.nosuch=1: .*nosuch"):
        summary.model_from_config(config, ["network.nosuch=1"])


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")
def test_instantiate_config_builds_what_train_py_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    # tools/train.py runs tasks.cli.main; stop it where `validate` would start and keep what it built.
    from lightning.pytorch import Trainer

    from tasks.cli import main

    built = {}

    def keep(trainer: Trainer, model: object = None, datamodule: object = None, **kwargs: object) -> list:
        built.update(task=model, data=datamodule)
        return []

    monkeypatch.setattr(Trainer, "validate", keep)
    config = ROOT / "configs" / "ssdlite_mobilenetv2_coco.yaml"
    main(["validate", "--config", str(config), "--trainer.logger", "false"])
    task, data = instantiate_config(config)
    assert type(task) is type(built["task"]) and type(data) is type(built["data"])
    ours, theirs = task.network, built["task"].network
    assert type(ours) is type(theirs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 4_500_543
    # Same seed_everything from the config: the same initial weights, tensor for tensor.
    theirs_state = theirs.state_dict()
    assert ours.state_dict().keys() == theirs_state.keys()
    assert all(value.equal(theirs_state[key]) for key, value in ours.state_dict().items())
    assert count(ours, 300)["madds"] == count(theirs, 300)["madds"]
