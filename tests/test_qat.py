"""Quantisation-aware fine-tuning (tasks/qat.py, tools/export.py --int8 --qat-steps): the fake-quant
graph quantises every convolution, computes what the network computes once fake quantisation is
off (BatchNorm eps included), trains the network's own weights, and ships through the same INT8
export as post-training quantisation."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchao.quantization.pt2e import move_exported_model_to_eval
from torchao.quantization.pt2e.fake_quantize import disable_fake_quant

from tasks import deploy, qat
from tasks.checkpoints import load_task
from tasks.evaluation.checkpoint import load_datamodule
from tools import export

STEPS = 2


@pytest.fixture(scope="module")
def checkpoints(detection_checkpoint: Path, segmentation_checkpoint: Path) -> dict[str, Path]:
    return {"detection": detection_checkpoint, "segmentation": segmentation_checkpoint}


def example_images(task_name: str) -> torch.Tensor:
    size = 128 if task_name == "detection" else 65  # the tiny checkpoints' sizes (tests/conftest.py)
    return torch.randint(0, 256, (2, 3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def outputs(module: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: value for name, value in module(images).items() if name != "anchors"}


@pytest.mark.parametrize("task_name", ["detection", "segmentation"])
def test_the_fake_quant_graph_quantises_every_convolution_and_is_the_network_without_it(
    task_name: str, checkpoints: dict[str, Path]
) -> None:
    task = load_task(checkpoints[task_name])
    images = example_images(task_name)
    want = outputs(task.network.eval(), images)
    prepared = qat.prepare_network(task.network, images)

    per_channel = [fq for fq in qat.fake_quantizers(prepared) if fq.qscheme == torch.per_channel_symmetric]
    convolutions = [m for m in task.network.modules() if isinstance(m, nn.Conv2d)]
    assert len(per_channel) == len(convolutions)  # one weight quantiser per convolution

    move_exported_model_to_eval(prepared)
    quantised = outputs(prepared, images)
    prepared.apply(disable_fake_quant)
    exact = outputs(prepared, images)
    for name, value in want.items():
        scale = value.abs().max().item()
        # Off, the graph is the float network (the head's BatchNorm eps 1e-3 included: 2.0 off without
        # qat.match_batch_norm_eps); on, the int8 grid moves the outputs.
        assert (exact[name] - value).abs().max().item() < 1e-4 * scale
        assert (quantised[name] - value).abs().max().item() > 1e-3 * scale


def test_matching_the_batch_norm_eps_keeps_what_the_layer_computes_in_evaluation() -> None:
    layer = nn.BatchNorm2d(4, eps=1e-3).eval()
    with torch.no_grad():
        layer.running_var.copy_(torch.tensor([0.0, 1e-3, 0.5, 4.0]))
        layer.running_mean.uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    want = layer(x)
    assert qat.match_batch_norm_eps(nn.Sequential(layer, nn.BatchNorm2d(4))) == 1  # the second has 1e-5
    assert layer.eps == qat.TORCHAO_BN_EPS
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("update_batch_norm", [False, True])
def test_fine_tuning_trains_the_network_s_own_weights(update_batch_norm: bool, checkpoints: dict[str, Path]) -> None:
    task = load_task(checkpoints["detection"])
    before = copy.deepcopy(task.network.state_dict())
    datamodule = load_datamodule(checkpoints["detection"], num_workers=0, persistent_workers=False)
    report = qat.finetune(task, datamodule, STEPS, progress=False, update_batch_norm=update_batch_norm)

    assert report["steps"] == STEPS and report["fake_quantizers"] > 0 and torch.isfinite(torch.tensor(report["loss"]))
    assert report["batch_norm"] == ("updated" if update_batch_norm else "frozen")
    after = task.network.state_dict()
    convolution_weights = [name for name in before if name.endswith("conv.weight")]
    assert convolution_weights and all(not torch.equal(before[n], after[n]) for n in convolution_weights)
    # Frozen (the default): the running statistics stay; updated: they move, as in training.
    statistics = [name for name in before if name.endswith("running_mean")]
    moved = [name for name in statistics if not torch.equal(before[name], after[name])]
    assert moved == (statistics if update_batch_norm else [])
    assert not task.network.training


def test_copying_back_names_a_parameter_the_graph_lacks() -> None:
    network = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    graph = nn.Sequential(nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match=r"lacks 2 of the network's parameters, e.g. \['1.weight', '1.bias'\]"):
        qat.copy_weights_back(graph, network)
    with pytest.raises(ValueError, match="at least one step"):
        qat.finetune(nn.Module(), None, 0)  # type: ignore[arg-type]


def run_export(*args: object, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any] | None, str, str]:
    try:
        report, code = export.main([str(arg) for arg in args]), 0
    except SystemExit as stop:
        report, code = None, int(stop.code or 0)
    captured = capsys.readouterr()
    return code, report, captured.out, captured.err


def test_export_quantises_the_fine_tuned_copy_and_compares_it_with_the_checkpoint_s_own_model(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [checkpoints["segmentation"], "--input-size", "65", "--int8", "--calibration-images", "4"]
    code, plain, _, err = run_export(*common, "--out", tmp_path / "ptq.onnx", "--min-agreement", "0.5", capsys=capsys)
    assert code == 0, err
    code, report, out, err = run_export(
        *common, "--out", tmp_path / "qat.onnx", "--min-agreement", "0.5", "--qat-steps", STEPS, capsys=capsys
    )
    assert code == 0, err
    assert f"after {STEPS} quantisation-aware steps" in out
    assert report is not None and plain is not None and report["int8"]["qat"]["steps"] == STEPS
    # The float file is the checkpoint's own model, as without QAT; the INT8 file is another.
    assert (tmp_path / "qat.onnx").read_bytes() == (tmp_path / "ptq.onnx").read_bytes()
    assert (tmp_path / "qat.int8.onnx").read_bytes() != (tmp_path / "ptq.int8.onnx").read_bytes()
    recorded = json.loads(deploy.read_metadata(tmp_path / "qat.int8.onnx")["quantization"])
    assert recorded["quantization_aware_fine_tuning"]["steps"] == STEPS
    assert "quantization_aware_fine_tuning" not in json.loads(deploy.read_metadata(tmp_path / "ptq.int8.onnx")["quantization"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--qat-steps", "2"], "--qat-steps fine-tunes for the INT8 file: add --int8"),
        (["--int8", "--qat-steps", "-1"], "--qat-steps must be 0 (none) or more, got -1"),
    ],
)
def test_export_refuses_qat_without_int8_or_with_negative_steps(
    flags: list[str], message: str, checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _, err = run_export(checkpoints["segmentation"], "--out", tmp_path / "m.onnx", *flags, capsys=capsys)
    assert code == 1 and err.strip() == f"error: {message}"
