"""tools/benchmark.py and tasks/benchmarking/: what it measures and how it reports (no timings are asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from tasks.benchmarking import speed
from tasks.benchmarking.convergence import bench_convergence
from tasks.benchmarking.report import format_report
from tasks.benchmarking.speed import AS_SHIPPED, FOLDED, FOLDED_CHANNELS_FIRST
from tasks.benchmarking.training_speed import SYNTHETIC_CONFIGS, task_and_data
from tools import benchmark

STATS = {"median_ms": 10.0, "q25_ms": 9.0, "q75_ms": 12.0, "images_per_s": 100.0}


def test_detection_model_row_counts_the_paper_model_and_times_network_and_postprocessing() -> None:
    row = speed.bench_model("ours_ssdlite_mobilenetv2", FOLDED, runs=2, warmup=1, threads=1, use_compile=False, use_onnx=False)
    assert row["params"] == 4_500_543  # the unfolded paper model (91 classes), as tools/summary.py counts it
    assert (row["model"], row["treatment"], row["input"]) == ("ours_ssdlite_mobilenetv2", FOLDED, 320)
    for key in ("network_b1", "eager_b1", "eager_b8"):
        assert row[key]["median_ms"] > 0 and row[key]["q25_ms"] <= row[key]["median_ms"] <= row[key]["q75_ms"]
    assert row["eager_b8"]["images_per_s"] == pytest.approx(8000 / row["eager_b8"]["median_ms"])


@pytest.mark.parametrize("name", ["tv_ssdlite320_mobilenet_v3_large", "tv_lraspp_mobilenet_v3_large"])
def test_torchvision_models_get_the_treatment_ours_get(name: str) -> None:
    contender = speed.build(name)
    shipped = speed.apply_treatment(contender.model, AS_SHIPPED)
    folded = speed.apply_treatment(contender.model, FOLDED)
    assert any(isinstance(m, nn.BatchNorm2d) for m in shipped.modules())  # the original is left as it was
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs if m.kernel_size != (1, 1))
    images = contender.images(1, 160 if name.startswith("tv_lraspp") else contender.size)
    with torch.no_grad():  # the same function: network outputs equal up to float rounding
        for a, b in zip(speed.RawOutputs(shipped)(images), speed.RawOutputs(folded)(images)):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


def test_report_leads_with_fair_ratios_computed_from_the_rows() -> None:
    rows = [("ours_deeplabv3_mobilenetv2", FOLDED), ("tv_lraspp_mobilenet_v3_large", FOLDED), ("tv_lraspp_mobilenet_v3_large", AS_SHIPPED)]
    options = {"runs": 1, "warmup": 0, "threads": 1, "use_compile": False, "use_onnx": False, "size": 128}
    models = [speed.bench_model(name, treatment, **options) for name, treatment in rows[:2]]
    models += speed.run_models(rows[2:], **options, log=lambda _: None)  # as tools/benchmark.py runs it: a fresh process
    assert [(r["model"], r["treatment"]) for r in models] == rows
    ours, fair, shipped = (r["eager_b1"]["median_ms"] for r in models)
    ours8, fair8, shipped8 = (r["eager_b8"]["median_ms"] for r in models)
    lines = format_report({"machine": "m", "threads": 1, "models": models}).splitlines()
    pair = "| ours_deeplabv3_mobilenetv2 / tv_lraspp_mobilenet_v3_large |"
    fair_line = f"{pair} folded, channels-last (fair) | {ours / fair:.2f} | {ours8 / fair8:.2f} |"
    shipped_line = f"{pair} as shipped | {ours / shipped:.2f} | {ours8 / shipped8:.2f} |"
    assert "| ours / torchvision, median latency | torchvision's treatment | eager_b1 | eager_b8 |" in lines
    table = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    assert lines.index(fair_line) < lines.index(shipped_line) < table  # the fair ratio first, before the table
    for treatment in (FOLDED, AS_SHIPPED):
        row = f"| tv_lraspp_mobilenet_v3_large | {treatment} | random | 21 | 128 |"
        assert sum(line.startswith(row) for line in lines) == 1


def test_compiled_path_compiles_the_call_that_is_timed() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.conv(images).relu()

        def detect(self, images: torch.Tensor) -> torch.Tensor:
            return self(images).amax(dim=(2, 3))

    torch._dynamo.reset()
    model, images = Tiny().eval(), torch.rand(1, 3, 16, 16)
    before = speed.compiled_graphs()
    torch.compile(model, backend="eager").detect(images)  # the old way: .detect of what compile returned
    assert speed.compiled_graphs() == before  # ... ran the original module, compiling nothing
    row = speed.bench_compiled(lambda m, x: m.detect(x), model, images, runs=1, warmup=0, backend="eager")
    assert row["compile_graphs"] >= 1 and row["compile_b1"]["median_ms"] > 0


def test_trained_detection_rows_load_the_ablation_weights_and_time_validation_images(
    synthetic_coco: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.models.detection.ssd import SSD

    from tasks.benchmarking import ablation

    monkeypatch.setattr(speed, "SYNTHETIC_VALIDATION", synthetic_coco / "val2017")
    variants = {v.name: v for v in ablation.VARIANTS}
    for name, variant in speed.TRAINED_DETECTORS.items():
        task = ablation.build(variants[variant], 1, synthetic_coco, SYNTHETIC_CONFIGS["detection"])[0]
        saved = task.state_dict()
        torch.save(saved, tmp_path / f"{variant}.pt")
        contender = speed.build(name, str(tmp_path / f"{variant}.pt"))
        assert contender.is_detector and contender.classes == 6 and contender.size == 320
        if variant == "torchvision":  # torchvision's own SSD object, its transform included
            assert isinstance(contender.model, SSD)
            mine = {f"network.ssd.{key}": value for key, value in contender.model.state_dict().items()}
        else:
            assert contender.model.head.detections_per_image == 300  # torchvision's budget
            mine = {f"network.{key}": value for key, value in contender.model.state_dict().items()}
        assert mine.keys() <= saved.keys() and all(torch.equal(mine[key], saved[key]) for key in mine)
    # The same validation images every call, resized to the input: not noise.
    first, again = speed.validation_images(2, 320), speed.validation_images(2, 320)
    assert first.shape == (2, 3, 320, 320) and torch.equal(first, again) and first.max() > 1
    row = speed.bench_model(
        "tv_ssdlite320_mobilenet_v3_large", FOLDED, runs=1, warmup=0, threads=1, use_compile=False, use_onnx=False,
        weights=str(tmp_path / "torchvision.pt"),
    )  # fmt: skip
    assert (row["weights"], row["classes"]) == ("trained", 6)

    # The weights come from the ablation's seed-0 runs, trained there when missing.
    asked: list[tuple[list[str], tuple[int, ...]]] = []
    monkeypatch.setattr(ablation, "run_ablation", lambda out, variants, seeds, log: asked.append((variants, seeds)))
    paths = speed.trained_detectors(tmp_path / "ablation", log=lambda _: None)
    assert asked == [(["ours", "torchvision"], (0,))]
    assert paths == {
        "ours_ssdlite_mobilenetv2": str(tmp_path / "ablation" / "ours" / "seed0" / "step400.pt"),
        "tv_ssdlite320_mobilenet_v3_large": str(tmp_path / "ablation" / "torchvision" / "seed0" / "step400.pt"),
    }


def test_channels_first_treatment_folds_and_keeps_the_layout() -> None:
    contender = speed.build("ours_deeplabv3_mobilenetv2")
    first = speed.apply_treatment(contender.model, FOLDED_CHANNELS_FIRST)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in first.modules())
    def full_convs(model: nn.Module) -> list[torch.Tensor]:  # a depthwise or 1x1 weight has one layout
        return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) and m.groups == 1]

    assert full_convs(first) and not any(w.is_contiguous(memory_format=torch.channels_last) for w in full_convs(first))
    folded = full_convs(speed.apply_treatment(contender.model, FOLDED))
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in folded)


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_train_and_data_sections_use_the_synthetic_configs(task: str, tmp_path: Path) -> None:
    config = yaml.safe_load(SYNTHETIC_CONFIGS[task].read_text())
    model, data = task_and_data(task, tmp_path, None, None)
    assert type(model).__name__ == config["model"]["class_path"].rsplit(".", 1)[1]
    assert data.hparams.batch_size == config["data"]["init_args"]["batch_size"]
    assert data.hparams.num_workers == config["data"]["init_args"]["num_workers"]
    assert Path(data.hparams.root).parent == tmp_path
    _, overridden = task_and_data(task, tmp_path, 3, 0)
    assert (overridden.hparams.batch_size, overridden.hparams.num_workers) == (3, 0)


def test_report_is_a_markdown_table_per_section() -> None:
    report = {
        "machine": "test cpu", "threads": 2,
        "models": [
            {"model": "ours", "treatment": FOLDED, "input": 320, "params": 4.5e6, "madds": 8.0e8, "network_b1": STATS,
             "eager_b1": STATS, "eager_b8": STATS, "onnx_b1": STATS, "onnx_b8": STATS, "peak_rss_mb": 300,
             "weights": "trained", "classes": 6},
            {"model": "ours", "treatment": FOLDED_CHANNELS_FIRST, "input": 320, "params": 4.5e6, "madds": 8.0e8,
             "network_b1": STATS, "eager_b1": {**STATS, "median_ms": 15.0}, "eager_b8": {**STATS, "median_ms": 12.0},
             "onnx_b1": STATS, "onnx_b8": STATS, "peak_rss_mb": 300, "weights": "trained", "classes": 6},
            {"model": "theirs", "treatment": AS_SHIPPED, "input": 512, "params": 3.2e6, "madds": 2.0e9, "eager_b1": STATS,
             "eager_b8": STATS, "onnx_b1": {"error": "RuntimeError: no"}, "peak_rss_mb": 200},
        ],
        "train": [{"task": "detection", "batch": 16, "workers": 1, "images_per_s": 12.5}],
        "data": [{"task": "detection", "batch": 16, "workers": 1, "images_per_s": 80.0}],
        "eval": [{"what": "COCO eval", "seconds": 6.5}],
    }  # fmt: skip
    lines = format_report(report).splitlines()
    assert lines[0] == "Machine: test cpu; 2 threads."
    row = "| ours | folded | trained | 6 | 320 | 4.50M | 0.80B | 10.0 | 10.0 (9.0-12.0) | 100.0 | 10.0 (9.0-12.0) | 100.0 | 300 |"
    assert row in lines
    assert "| theirs | as shipped | random | - | 512 | 3.20M | 2.00B | - | 10.0 (9.0-12.0) | 100.0 | - | - | 200 |" in lines
    # What channels-last alone brings: channels-first / channels-last latency of the same folded model.
    assert "| channels-first / channels-last, median latency (both folded) | network_b1 | eager_b1 | eager_b8 | onnx_b1 | onnx_b8 |" in lines
    assert "| ours | 1.00 | 1.50 | 1.20 | 1.00 | 1.00 |" in lines
    assert "- theirs (as shipped) onnx_b1: RuntimeError: no" in lines
    assert "| detection | training step (data included) | 16 | 1 | 12.5 |" in lines
    assert "| detection | data pipeline alone | 16 | 1 | 80.0 |" in lines
    assert "| COCO eval | 6.50 |" in lines


def test_command_line_refuses_unknown_sections(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--only", "models,speed"])
    assert "--only: unknown sections ['speed']" in capsys.readouterr().err
    sections, options, _ = benchmark.parse_args(["--only", "eval", "--runs", "3", "--compile"])
    assert sections == ["eval"] and (options.runs, options.compile, options.onnx) == (3, True, False)


def test_convergence_section_trains_through_the_cli_and_reports_the_curve(synthetic_coco: Path, tmp_path: Path) -> None:
    from tests.conftest import TINY

    tiny = [*TINY, "--model.network.image_size", "128", "--data.batch_size", "4",
            "--data.persistent_workers", "false", "--trainer.max_steps", "4"]  # fmt: skip
    run = bench_convergence(SYNTHETIC_CONFIGS["detection"], synthetic_coco, tmp_path, tiny)
    assert [point["step"] for point in run["curve"]] == [2, 4]  # validation every 2 steps (TINY)
    assert all(0.0 <= point["AP"] <= 1.0 and 0.0 <= point["AP50"] <= 1.0 for point in run["curve"])
    assert run["config"] == "configs/ssdlite_mobilenetv2_synthetic.yaml" and run["seconds"] > 0
    lines = format_report({"machine": "m", "threads": 1, "convergence": run}).splitlines()
    assert "| step | AP | AP50 | AP75 |" in lines
    assert lines[-1].startswith("| 4 | ")


def test_training_step_section_times_both_models_and_reports_both_ratios() -> None:
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    from tasks.benchmarking.training_step import bench_training_step
    from tasks.complexity import count
    from tasks.networks import SSDLiteMobileNetV2

    result = bench_training_step(batch_size=2, image_size=128, rounds=1, warmup=0, threads=1)
    assert [r["model"] for r in result["models"]] == ["ours_ssdlite_mobilenetv2", "tv_ssdlite320_mobilenet_v3_large"]
    assert (result["batch"], result["image_size"], result["threads"], result["num_classes"]) == (2, 128, 1, 6)
    for row in result["models"]:
        assert 0 < row["q25_s"] <= row["step_s"] <= row["q75_s"] and row["madds"] > 0
        assert 0 <= row["system_s"] <= row["cpu_s"] and row["cpu_s"] > 0 and row["page_faults"] >= 0
        assert row["images_per_s"] == pytest.approx(2 / row["step_s"])
    ours, theirs = result["models"]
    assert result["step_time_ratio"] == pytest.approx(ours["step_s"] / theirs["step_s"])

    class TorchvisionNetwork(nn.Module):  # torchvision's SSD without its transform and post-processing
        def __init__(self) -> None:
            super().__init__()
            self.ssd = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=6)

        def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.ssd.head(list(self.ssd.backbone(images).values()))

    expected = count(SSDLiteMobileNetV2(num_classes=6), 128)["madds"] / count(TorchvisionNetwork(), 128)["madds"]
    assert result["multiply_add_ratio"] == pytest.approx(expected, rel=1e-12)
    assert expected > 1  # ours has more multiply-adds: the ratio the step time is held to
    lines = format_report({"machine": "m", "threads": 1, "train_step": result}).splitlines()
    ratio_line = f"training step ours / torchvision: {ours['step_s'] / theirs['step_s']:.2f} (multiply-adds: {expected:.2f})"
    assert ratio_line in lines
    assert sum(line.startswith(("| ours_ssdlite_mobilenetv2 | ", "| tv_ssdlite320_mobilenet_v3_large | ")) for line in lines) == 2


def test_training_step_contenders_train_channels_last_and_their_steps_update_the_weights() -> None:
    from tasks.benchmarking.training_step import build_ours, build_torchvision, synthetic_batch

    images, targets = synthetic_batch(2, 128)
    assert images.dtype == torch.uint8 and all(t["boxes"].shape == (3, 4) and t["labels"].min() >= 1 for t in targets)
    assert torch.equal(images, synthetic_batch(2, 128)[0])  # the same batch every time
    for build in (build_ours, build_torchvision):
        contender = build(images, targets)
        convs = [m for m in contender.model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
        assert contender.model.training and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
        first = next(contender.model.backbone.parameters())  # the first convolution's weight
        before = first.detach().clone()
        loss = contender.step()
        assert torch.isfinite(loss) and loss > 0
        assert not torch.equal(before, first)  # the gradient reached the input end and AdamW stepped ...
        assert len(contender.optimizer.state) == sum(1 for _ in contender.model.parameters())  # ... over every weight


def test_training_step_profile_splits_each_step_into_phases_and_operator_categories() -> None:
    from tasks.benchmarking.training_step import _labelled, _marks, build_ours, profile_training_step, synthetic_batch

    rows = profile_training_step(batch_size=2, image_size=128, steps=1, warmup=0, threads=1)
    assert list(dict.fromkeys(r["model"] for r in rows)) == ["ours_ssdlite_mobilenetv2", "tv_ssdlite320_mobilenet_v3_large"]
    for model in ("ours_ssdlite_mobilenetv2", "tv_ssdlite320_mobilenet_v3_large"):
        phases = {r["name"]: r for r in rows if r["model"] == model and r["kind"] == "phase"}
        ops = {r["name"]: r for r in rows if r["model"] == model and r["kind"] == "op"}
        assert sum(r["share"] for r in phases.values()) == pytest.approx(1.0)
        assert sum(r["share"] for r in ops.values()) == pytest.approx(1.0)
        assert list(ops) == ["copies", "convolution", "batch norm", "activation", "other"]
        for name in ("backbone forward", "head forward", "backward", "optimiser"):
            assert phases[name]["ms"] > 0 and 0 < phases[name]["share"] < 1
        assert ops["convolution"]["ms"] > 0 and ops["batch norm"]["ms"] > 0 and ops["activation"]["ms"] > 0
    ours = {r["name"]: r for r in rows if r["model"] == "ours_ssdlite_mobilenetv2"}
    assert list(name for name, r in ours.items() if r["kind"] == "phase") == [
        "normalize", "backbone forward", "head forward", "matching + loss", "backward", "optimiser", "between phases"
    ]  # fmt: skip
    assert 0 < ours["matching + loss: matching"]["ms"] <= ours["matching + loss"]["ms"]
    assert ours["head forward: anchors"]["ms"] <= ours["head forward"]["ms"]

    images, targets = synthetic_batch(2, 64)
    contender = build_ours(images, targets)
    generator = contender.model.head.anchor_generator
    with _labelled(sum(_marks(contender), [])):
        assert "forward" in vars(contender.model.backbone)
    assert "forward" not in vars(contender.model.backbone) and "loss" not in vars(contender.model)
    assert contender.model.head.anchor_generator is generator  # the labels are undone

    lines = format_report({"machine": "m", "threads": 1, "train_step": {
        "batch": 2, "image_size": 128, "num_classes": 6, "threads": 1, "rounds": 1, "step_time_ratio": 1.5,
        "multiply_add_ratio": 1.63, "models": [], "profile": rows}}).splitlines()  # fmt: skip
    assert "training step ours / torchvision: 1.50 (multiply-adds: 1.63)" in lines
    assert "| ours_ssdlite_mobilenetv2: phase | ms | share |" in lines
    assert any(line.startswith("| matching + loss: matching | ") for line in lines)
    header = "| operators' own time | ours_ssdlite_mobilenetv2 ms | share | tv_ssdlite320_mobilenet_v3_large ms | share |"
    assert header in lines and any(line.startswith("| convolution | ") for line in lines)
