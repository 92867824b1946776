"""The learning-speed ablation (tasks/benchmarking/ablation.py): what it trains, scores, keeps and prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from tasks.benchmarking import ablation
from tasks.benchmarking.ablation import VARIANTS, format_ablation, run_ablation
from tasks.benchmarking.report import format_report
from tasks.benchmarking.training_speed import SYNTHETIC_CONFIGS

TINY = (
    "--model.network.width_mult=0.35", "--model.network.image_size=128", "--data.batch_size=4",
    "--data.eval_batch_size=4", "--data.num_workers=0", "--data.persistent_workers=false",
)  # fmt: skip


def test_a_run_saves_weights_every_interval_and_scores_them_with_both_batchnorm_statistics(
    synthetic_coco: Path, tmp_path: Path
) -> None:
    results = run_ablation(tmp_path, variants=["ours"], seeds=(0,), data_root=synthetic_coco, steps=4, every=2, extra=TINY)
    run = results["ours/seed0"]
    assert sorted(run["steps"]) == ["2", "4"] and "AP_300" in run["steps"]["4"]
    assert sorted(p.name for p in (tmp_path / "ours" / "seed0").iterdir()) == ["step2.pt", "step4.pt"]
    assert json.loads((tmp_path / "results.json").read_text()) == results

    # An independent score of the saved step-4 weights: a fresh task, its own validation.
    task, data = ablation.build(VARIANTS[0], 0, synthetic_coco, SYNTHETIC_CONFIGS["detection"], TINY)
    task.load_state_dict(torch.load(tmp_path / "ours" / "seed0" / "step4.pt", weights_only=True))
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert trainer.validate(task, datamodule=data, verbose=False)[0]["val/AP"] == pytest.approx(
        run["steps"]["4"]["AP_running"], abs=1e-9
    )

    # A second call trains nothing: the results are kept.
    def refuse(*args: object, **kwargs: object) -> float:
        raise AssertionError("retrained a kept result")

    ablation_train = ablation.train
    try:
        ablation.train = refuse  # type: ignore[assignment]
        again = run_ablation(tmp_path, variants=["ours"], seeds=(0,), data_root=synthetic_coco, steps=4, every=2, extra=TINY)
    finally:
        ablation.train = ablation_train  # type: ignore[assignment]
    assert again == results

    # A kept result that lacks a step is scored from the saved weights, without training.
    scores = json.loads(json.dumps(run["steps"]))
    del results["ours/seed0"]["steps"]["2"]
    (tmp_path / "results.json").write_text(json.dumps(results))
    try:
        ablation.train = refuse  # type: ignore[assignment]
        completed = run_ablation(
            tmp_path, variants=["ours"], seeds=(0,), data_root=synthetic_coco, steps=4, every=2, extra=TINY
        )
    finally:
        ablation.train = ablation_train  # type: ignore[assignment]
    assert completed["ours/seed0"]["steps"] == scores
    assert list(completed["ours/seed0"]["steps"]) == ["2", "4"]


def test_the_fingerprint_follows_the_settings_not_the_comments(tmp_path: Path) -> None:
    config = SYNTHETIC_CONFIGS["detection"]
    text = config.read_text()
    commented, changed = tmp_path / "commented.yaml", tmp_path / "changed.yaml"
    commented.write_text("# a new remark\n" + text.replace("backbone_init: normal", "backbone_init: normal  # why"))
    changed.write_text(text.replace("backbone_init: normal", "backbone_init: kaiming"))
    assert changed.read_text() != text
    key = ablation.fingerprint(config, [], 400, 50)
    assert ablation.fingerprint(commented, [], 400, 50) == key
    assert ablation.fingerprint(changed, [], 400, 50) != key
    assert ablation.fingerprint(config, ["--seed_everything=1"], 400, 50) != key
    assert ablation.fingerprint(config, [], 200, 50) != key


def _fake(name: str, seed: int, ap: float) -> dict[str, object]:
    return {"variant": name, "seed": seed, "recipe": "r", "train_seconds": 1.0,
            "steps": {"200": {"AP": ap / 2, "AP_running": ap / 4}, "400": {"AP": ap, "AP_running": ap / 3}}}  # fmt: skip


def test_a_second_seed_runs_for_curves_and_for_variants_close_to_ours(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    trained: list[str] = []
    finals = {
        "ours": 0.60, "torchvision": 0.70, "focal_loss": 0.58, "no_min_negatives": 0.50,
        "kaiming_backbone_init": 0.52, "torchvision_default_boxes": 0.53,
    }  # fmt: skip

    def fake_train(variant: ablation.Variant, seed: int, *args: object) -> float:
        trained.append(f"{variant.name}/seed{seed}")
        return 1.0

    def fake_score(variant: ablation.Variant, seed: int, *args: object) -> dict[str, dict[str, float]]:
        return _fake(variant.name, seed, finals[variant.name])["steps"]  # type: ignore[return-value]

    monkeypatch.setattr(ablation, "train", fake_train)
    monkeypatch.setattr(ablation, "score", fake_score)
    run_ablation(tmp_path, variants=list(finals), seeds=(0, 1))
    # focal is 0.02 from ours: a second seed; no_min_negatives is 0.10 away: one seed. The
    # default boxes are compared with their own baseline (Kaiming init, 0.01 away): a second seed.
    assert trained == ["ours/seed0", "ours/seed1", "torchvision/seed0", "torchvision/seed1",
                       "kaiming_backbone_init/seed0", "torchvision_default_boxes/seed0",
                       "torchvision_default_boxes/seed1", "no_min_negatives/seed0", "focal_loss/seed0",
                       "focal_loss/seed1"]  # fmt: skip


def test_the_table_gives_means_each_seed_and_the_difference_to_the_baseline() -> None:
    results = {f"{name}/seed{seed}": _fake(name, seed, ap) for name, seed, ap in
               [("ours", 0, 0.60), ("ours", 1, 0.64), ("torchvision", 0, 0.70), ("focal_loss", 0, 0.50),
                ("kaiming_backbone_init", 0, 0.55), ("torchvision_default_boxes", 0, 0.56)]}  # fmt: skip
    lines = format_ablation(results).splitlines()
    ours = next(line for line in lines if line.startswith("| ours |"))
    assert "| 2 | 0.310 (0.300, 0.320) | 0.620 (0.600, 0.640) | - | - |" in ours
    focal = next(line for line in lines if line.startswith("| focal_loss |"))
    assert "| 1 | 0.250 | 0.500 | ours | -0.100 |" in focal  # against ours' seed 0 alone
    boxes = next(line for line in lines if line.startswith("| torchvision_default_boxes |"))
    assert "| 1 | 0.280 | 0.560 | kaiming_backbone_init | +0.010 |" in boxes
    assert "| step | ours AP | ours running BN | torchvision AP | torchvision running BN |" in lines
    assert "| 400 | 0.620 | 0.207 | 0.700 | 0.233 |" in lines
    assert format_ablation(results) in format_report({"machine": "m", "threads": 1, "ablation": results})


def test_unknown_variants_are_refused_with_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown ablation variants \\['nope'\\]; choose from ours, torchvision"):
        run_ablation(tmp_path, variants=["nope"])
