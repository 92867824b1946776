"""tools/benchmark.py: what it measures and how it reports (no timings are asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tools import benchmark


def test_detection_model_row_counts_the_trained_model_and_times_network_and_postprocessing() -> None:
    row = benchmark.bench_model("ours_ssdlite_mobilenetv2", runs=2, warmup=1, threads=1, use_compile=False, use_onnx=False)
    assert row["params"] == 4_500_543  # the unfused paper model (91 classes), as tools/summary.py counts it
    assert row["input"] == 320
    for key in ("network_b1", "eager_b1", "eager_b8"):
        assert row[key]["median_ms"] > 0 and row[key]["q25_ms"] <= row[key]["median_ms"] <= row[key]["q75_ms"]
    assert row["eager_b8"]["images_per_s"] == pytest.approx(8000 / row["eager_b8"]["median_ms"])


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_train_and_data_sections_use_the_synthetic_configs(task: str, tmp_path: Path) -> None:
    config = yaml.safe_load(benchmark.SYNTHETIC_CONFIGS[task].read_text())
    model, data = benchmark.task_and_data(task, tmp_path, None, None)
    assert type(model).__name__ == config["model"]["class_path"].rsplit(".", 1)[1]
    assert data.hparams.batch_size == config["data"]["init_args"]["batch_size"]
    assert data.hparams.num_workers == config["data"]["init_args"]["num_workers"]
    assert Path(data.hparams.root).parent == tmp_path
    _, overridden = benchmark.task_and_data(task, tmp_path, 3, 0)
    assert (overridden.hparams.batch_size, overridden.hparams.num_workers) == (3, 0)


def test_report_is_a_markdown_table_per_section() -> None:
    stats = {"median_ms": 10.0, "q25_ms": 9.0, "q75_ms": 12.0, "images_per_s": 100.0}
    report = {
        "machine": "test cpu", "threads": 2,
        "models": [
            {"model": "ours", "input": 320, "params": 4.5e6, "madds": 8.0e8, "network_b1": stats, "eager_b1": stats,
             "eager_b8": stats, "onnx_b1": stats, "onnx_b8": stats, "peak_rss_mb": 300},
            {"model": "theirs", "input": 512, "params": 3.2e6, "madds": 2.0e9, "eager_b1": stats, "eager_b8": stats,
             "peak_rss_mb": 200},
        ],
        "train": [{"task": "detection", "batch": 16, "workers": 1, "images_per_s": 12.5}],
        "data": [{"task": "detection", "batch": 16, "workers": 1, "images_per_s": 80.0}],
        "eval": [{"what": "COCO eval", "seconds": 6.5}],
    }  # fmt: skip
    lines = benchmark.format_report(report).splitlines()
    assert lines[0] == "Machine: test cpu; 2 threads."
    assert "| ours | 320 | 4.50M | 0.80B | 10.0 | 10.0 (9.0-12.0) | 100.0 | 10.0 (9.0-12.0) | 100.0 | 300 |" in lines
    assert "| theirs | 512 | 3.20M | 2.00B | - | 10.0 (9.0-12.0) | 100.0 | - | - | 200 |" in lines
    assert "| detection | training step (data included) | 16 | 1 | 12.5 |" in lines
    assert "| detection | data pipeline alone | 16 | 1 | 80.0 |" in lines
    assert "| COCO eval | 6.50 |" in lines


def test_convergence_section_trains_through_the_cli_and_reports_the_curve(synthetic_coco: Path, tmp_path: Path) -> None:
    from tests.conftest import TINY

    tiny = [*TINY, "--data.image_size", "128", "--model.image_size", "128", "--data.batch_size", "4",
            "--data.persistent_workers", "false", "--trainer.max_steps", "4"]  # fmt: skip
    config = benchmark.SYNTHETIC_CONFIGS["detection"]
    run = benchmark.bench_convergence(config, synthetic_coco, tmp_path, tiny)
    assert [point["step"] for point in run["curve"]] == [2, 4]  # validation every 2 steps (TINY)
    assert all(0.0 <= point["AP"] <= 1.0 and 0.0 <= point["AP50"] <= 1.0 for point in run["curve"])
    assert run["config"] == "configs/ssdlite_mobilenetv2_synthetic.yaml" and run["seconds"] > 0
    lines = benchmark.format_report({"machine": "m", "threads": 1, "convergence": run}).splitlines()
    assert "| step | AP | AP50 | AP75 |" in lines
    assert lines[-1].startswith("| 4 | ")
