"""tasks/benchmarking/int8.py: the benchmark's INT8 section (issue 15), end to end on tiny models,
torchvision's SSDLite post-processing as one exportable graph, and the tools/benchmark.py hook."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tasks import deploy
from tasks.benchmarking import int8
from tasks.benchmarking.training_speed import SYNTHETIC_CONFIGS
from tasks.configs import instantiate_config
from tasks.networks import TorchvisionSSDLite
from tools import benchmark

# Tiny models: ours at width 0.35 and detection at 128x128; torchvision's detector keeps 320x320
# (given weights below, its AP is measured: the evaluator's data is the config's, at 320).
OVERRIDES = {
    int8.OURS_DETECTOR: ["--model.network.width_mult=0.35", "--model.network.image_size=128"],
    int8.OURS_SEGMENTER: ["--model.network.width_mult=0.35"],
}
WEIGHTED = (int8.TV_DETECTOR, int8.OURS_SEGMENTER)


@pytest.fixture(scope="module")
def result(synthetic_coco: Path, synthetic_voc: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run of the section on tiny settings; two models get saved (random) task weights, so
    their files are also scored on the validation split."""
    folder = tmp_path_factory.mktemp("int8")
    roots = {"detection": synthetic_coco, "segmentation": synthetic_voc}
    weights = {}
    for model in int8.MODELS:
        if model.name in WEIGHTED:
            overrides = [*model.overrides, *OVERRIDES.get(model.name, ()), f"--data.root={roots[model.task]}"]
            task, _ = instantiate_config(SYNTHETIC_CONFIGS[model.task], overrides)
            weights[model.name] = folder / f"{model.name}.pt"
            torch.save(task.state_dict(), weights[model.name])
    options = int8.Int8Options(
        weights=weights, calibration_images=2, parity_images=4, segmentation_size=64, threads=1, runs=1, warmup=0,
        out=folder / "files", data_roots=roots, overrides=OVERRIDES,
    )  # fmt: skip
    return int8.run_int8(options, log=lambda message: None)


def test_the_table_has_every_model_row_and_every_column(result: dict[str, Any]) -> None:
    table = int8.format_int8(result)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| model | float ms b1"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == list(int8.COLUMNS)
    start = lines.index(header) + 2
    rows = [line for line in lines[start:] if line.startswith("| ")][: len(int8.MODELS)]
    assert [row.split("|")[1].split(" (")[0].strip() for row in rows] == list(int8.MODEL_NAMES)
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == len(int8.COLUMNS)
        assert all(re.fullmatch(r"[0-9.]+x?", cell) for cell in cells[1:]), row
    for entry in result["models"]:
        for key in ("float_b1", "int8_b1", "float_b8", "int8_b8"):
            assert entry[key]["median_ms"] > 0
    sizes = {entry["model"]: entry["input"] for entry in result["models"]}
    assert sizes == {int8.OURS_DETECTOR: [128, 128], int8.TV_DETECTOR: [320, 320],
                     int8.OURS_SEGMENTER: [64, 64], int8.TV_SEGMENTER: [64, 64]}  # fmt: skip


def test_the_sizes_reported_are_the_files_sizes_on_disk(result: dict[str, Any]) -> None:
    table = int8.format_int8(result)
    for entry in result["models"]:
        float_path, int8_path = Path(entry["float_file"]), Path(entry["int8_file"])
        assert entry["float_bytes"] == float_path.stat().st_size
        assert entry["int8_bytes"] == int8_path.stat().st_size
        assert entry["parity"]["float_file_bytes"] == entry["float_bytes"]
        assert entry["int8_bytes"] < entry["float_bytes"]  # int8 weights: the file is quantised
        row = next(line for line in table.splitlines() if line.startswith(f"| {entry['model']} ("))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[6:] == [
            f"{entry['float_bytes'] / 1e6:.2f}",
            f"{entry['int8_bytes'] / 1e6:.2f}",
            f"{100 * entry['int8_bytes'] / entry['float_bytes']:.1f}",
        ]
        assert deploy.read_metadata(int8_path)["quantization"]


def test_models_given_weights_are_scored_as_float_and_int8_files(result: dict[str, Any]) -> None:
    for entry in result["models"]:
        if entry["model"] in WEIGHTED:
            accuracy = entry["accuracy"]
            assert accuracy["metric"] == int8.METRICS[entry["task"]]
            assert 0.0 <= accuracy["float"] <= 1.0 and 0.0 <= accuracy["int8"] <= 1.0
            for precision in ("float", "int8"):  # the evaluator's files, as tools/test.py writes them
                assert (Path(entry["float_file"]).parent / "eval" / f"{entry['model']}.{precision}" / "metrics.json").is_file()
        else:
            assert "accuracy" not in entry and entry["weights"] is None
    table = int8.format_int8(result)
    assert table.count("(random weights)") == len(int8.MODELS) - len(WEIGHTED)


def test_torchvision_detections_equal_torchvisions_postprocess() -> None:
    torch.manual_seed(0)
    network = TorchvisionSSDLite(num_classes=4, image_size=128, topk_candidates=30, detections_per_image=12).eval()
    network.ssd.score_thresh = 0.2
    with torch.no_grad():
        anchors = network(torch.zeros(1, 3, 128, 128))["anchors"]
    # Random head outputs: distinct scores, so both orders are defined.
    outputs = {
        "cls_logits": torch.randn(3, anchors.shape[0], 4) * 2,
        "bbox_regression": torch.randn(3, anchors.shape[0], 4),
        "anchors": anchors,
        "input_size": torch.tensor([128, 128]),
    }
    expected = network.postprocess(outputs, [(128, 128)] * 3)
    boxes, scores, labels, images = int8.torchvision_detections(
        outputs["cls_logits"], outputs["bbox_regression"], anchors, network.ssd, (128, 128)
    )
    assert sum(len(e["scores"]) for e in expected) > 12  # thresholds, top-k and NMS all at work
    for index, want in enumerate(expected):
        rows = images == index
        assert len(want["scores"]) <= 12
        torch.testing.assert_close(scores[rows], want["scores"])
        torch.testing.assert_close(labels[rows], want["labels"])
        torch.testing.assert_close(boxes[rows], want["boxes"])


def test_torchvision_ssdlite_exports_with_a_dynamic_batch_and_quantisable_layers(tmp_path: Path) -> None:
    import onnx

    from tasks.quantization import quantized_nodes

    torch.manual_seed(0)
    network = TorchvisionSSDLite(num_classes=3, image_size=128)
    # From scratch its activations vanish (N(0, 0.03) convs) and every box scores 1/3: ties that two
    # runtimes order differently. BatchNorm statistics of one batch give distinct scores.
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a cumulative average: after one batch, its statistics
    with torch.no_grad():
        network.train()(torch.rand(4, 3, 128, 128) * 255)
    network.eval()
    module = int8.ExportableTorchvisionSSDLite(deploy.optimize_for_inference(network), ["bg", "a", "b"]).eval()
    path = tmp_path / "tv.onnx"
    deploy.export_onnx(module, torch.rand(2, 3, 128, 128) * 255, path, dynamic_size=False)
    run = deploy.load_runner(path, "onnx", threads=1)
    for batch in (1, 3):
        report = deploy.verify(module, run, torch.rand(batch, 3, 128, 128) * 255)
        assert report["detections_matched"] == 1.0
    nodes = quantized_nodes(onnx.load(str(path)))
    assert any(n.startswith("/network/backbone/") for n in nodes) and any(n.startswith("/network/head/") for n in nodes)
    assert deploy.read_metadata(path)["input_size"] == "[128, 128]"


def test_weights_that_do_not_fit_are_refused_naming_the_file(tmp_path: Path) -> None:
    task, _ = instantiate_config(SYNTHETIC_CONFIGS["segmentation"], ["--model.network.width_mult=0.35"])
    path = tmp_path / "other.pt"
    torch.save({"network.head.classifier.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: its weights do not fit DeepLabV3MobileNetV2"):
        int8.load_weights(task, path)


def test_quantisation_aware_fine_tuning_scores_a_third_file_beside_float_and_int8(
    synthetic_voc: Path, tmp_path: Path
) -> None:
    model = next(model for model in int8.MODELS if model.name == int8.OURS_SEGMENTER)
    overrides = [*OVERRIDES[model.name], "--data.crop_size=65", "--data.batch_size=2", f"--data.root={synthetic_voc}"]
    task, _ = instantiate_config(SYNTHETIC_CONFIGS[model.task], overrides)
    torch.save(task.state_dict(), tmp_path / "weights.pt")
    options = int8.Int8Options(
        weights={model.name: tmp_path / "weights.pt"}, calibration_images=2, parity_images=2, segmentation_size=64,
        threads=1, runs=1, warmup=0, out=tmp_path / "files", data_roots={"segmentation": synthetic_voc},
        overrides={model.name: overrides[:3]}, qat_steps=1,
    )  # fmt: skip
    result = int8.run_int8(options, models=[model], log=lambda message: None)
    (row,) = result["models"]
    assert row["qat_steps"] == 1 and Path(row["qat_int8_file"]).is_file()
    assert Path(row["qat_int8_file"]).read_bytes() != Path(row["int8_file"]).read_bytes()
    assert (tmp_path / "files" / "eval" / f"{model.name}.qat_int8" / "metrics.json").is_file()
    table = int8.format_int8(result)
    assert "| int8 after 1 QAT steps | QAT int8 - float |" in table
    found = row["accuracy"]
    assert f"| {found['qat_int8']:.4f} | {found['qat_int8'] - found['float']:+.4f} |" in table


def test_the_benchmark_tool_accepts_the_section_and_its_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    argv = ["--only", "int8", "--runs", "3", "--int8-weights", f"{int8.TV_SEGMENTER}={weights}",
            "--calibration-images", "7", "--calibrator", "entropy", "--qat-steps", "5", "--random-detectors",
            "--json", str(tmp_path / "report.json")]  # fmt: skip
    sections, options, _ = benchmark.parse_args(argv)
    assert sections == ["int8"] and options.runs == 3
    seen: list[int8.Int8Options] = []

    def fake_run(options: int8.Int8Options, log: Any = print) -> dict[str, Any]:
        seen.append(options)
        return {"threads": 1, "calibration_images": 7, "calibrator": "minmax", "rounds": {"b1": 3, "b8": 1}, "models": []}

    monkeypatch.setattr(int8, "run_int8", fake_run)
    report = benchmark.main(argv)
    assert "int8" in report and seen[0].weights == {int8.TV_SEGMENTER: weights}
    assert (seen[0].calibration_images, seen[0].calibrator, seen[0].runs, seen[0].qat_steps) == (7, "entropy", 3, 5)
    assert "| model | float ms b1 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--only", "int8", "--int8-weights", f"nonsense={weights}"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--only", "int8", "--calibrator", "kl"])
