"""Speed and size of our models beside torchvision's, measured in one run on one machine.

    python tools/benchmark.py                       # everything, table + runs/benchmark.json
    python tools/benchmark.py --only models --runs 50 --onnx
    python tools/benchmark.py --only train,data --steps 20
    python tools/benchmark.py --only eval
    python tools/benchmark.py --only convergence    # ~10 minutes: SSDLite from scratch, 400 steps

Sections:
  models  parameters, multiply-adds, median latency at batch 1 (with the spread: 25th-75th
          percentile) and throughput at batch 8, for eager PyTorch, ``torch.compile`` (--compile)
          and ONNX Runtime (--onnx), plus peak resident memory. Each model runs in a fresh
          process so memory and caches do not leak between them. Detection latency includes
          post-processing (score threshold, top-k, NMS) on both sides.
  train   images per second of a full training step (data loading, forward, loss, backward,
          optimiser) with the synthetic configs (model, sizes, batch, workers) on synthetic data.
  data    images per second of the training data pipeline alone (decode + augment + collate).
  eval    COCO evaluation of 5,000 images x 100 detections with each backend; mIoU
          accumulation over 1,000 masks of 513x513.
  convergence (only when asked for) trains a synthetic config from scratch through
          tools/train.py (default: configs/ssdlite_mobilenetv2_synthetic.yaml, 400 steps) and
          prints its validation curve, with the wall-clock time.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from tasks.timing import timed_runs  # noqa: E402

SECTIONS = ("models", "train", "data", "eval")  # the default run
ON_REQUEST = ("convergence",)
CURVE_KEYS = {"val/AP": "AP", "val/AP50": "AP50", "val/AP75": "AP75", "val/mIoU": "mIoU"}


# ----------------------------------------------------------------------------------- models
def build_model(name: str) -> tuple[torch.nn.Module, int, Callable[[torch.nn.Module, torch.Tensor], Any]]:
    """(model in eval mode, input side, the call to time) for a model of the comparison."""
    import torchvision.models.detection as tvdet
    import torchvision.models.segmentation as tvseg

    from tasks.detection import ssdlite_mobilenetv2
    from tasks.segmentation import deeplabv3_mobilenetv2

    def forward(model: torch.nn.Module, images: torch.Tensor) -> Any:
        return model(images)

    if name == "ours_ssdlite_mobilenetv2":
        # Score threshold 0.001, NMS at 0.55 and 300 detections kept, as torchvision's SSDLite;
        # the 1000 best (anchor, class) candidates of an image go into NMS (torchvision: the
        # 300 best of every class, 27,000 at 90 classes).
        model = ssdlite_mobilenetv2(num_classes=91, score_threshold=0.001, detections_per_image=300)
        return model.eval(), 320, lambda m, x: m.detect(x)
    if name == "tv_ssdlite320_mobilenet_v3_large":
        return tvdet.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval(), 320, forward
    if name == "ours_deeplabv3_mobilenetv2":
        return deeplabv3_mobilenetv2(num_classes=21).eval(), 512, forward
    if name == "tv_lraspp_mobilenet_v3_large":
        return tvseg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None).eval(), 512, forward
    if name == "tv_deeplabv3_mobilenet_v3_large":
        model = tvseg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, aux_loss=False)
        return model.eval(), 512, forward
    raise ValueError(f"unknown model {name}")


MODELS = (
    "ours_ssdlite_mobilenetv2",
    "tv_ssdlite320_mobilenet_v3_large",
    "ours_deeplabv3_mobilenetv2",
    "tv_lraspp_mobilenet_v3_large",
    "tv_deeplabv3_mobilenet_v3_large",
)


def latency_stats(times: Sequence[float], batch: int) -> dict[str, float]:
    array = np.asarray(times) * 1000
    q25, median, q75 = np.percentile(array, [25, 50, 75])
    return {"median_ms": float(median), "q25_ms": float(q25), "q75_ms": float(q75), "images_per_s": batch * 1000 / float(median)}


def onnx_runner(model: torch.nn.Module, name: str, size: int, folder: Path, threads: int) -> Callable[[np.ndarray], Any]:
    """Export ``model`` with ``tools/export.py``'s exporter (:mod:`tasks.deploy`); return an ONNX Runtime call.

    Ours go through the deployment wrappers (detection with its NMS inside the graph);
    torchvision's segmenters export their ``out`` logits.
    """
    from tasks.deploy import ExportableDetector, ExportableSegmenter, export_onnx, load_runner

    if name == "ours_ssdlite_mobilenetv2":
        wrapper: torch.nn.Module = ExportableDetector(model, postprocess=True)
    elif name == "ours_deeplabv3_mobilenetv2":
        wrapper = ExportableSegmenter(model, output="logits")
    else:
        wrapper = _RawOutputs(model)
        wrapper.output_names = ("out",)
    export_onnx(wrapper.eval(), torch.zeros(1, 3, size, size), folder / f"{name}.onnx", dynamic_size=False)
    return load_runner(folder / f"{name}.onnx", "onnx", threads)


def bench_model(name: str, runs: int, warmup: int, threads: int, use_compile: bool, use_onnx: bool) -> dict[str, Any]:
    """Measure one model in this process (call through ``--model`` for a fresh process)."""
    from tasks.complexity import count
    from tasks.deploy import optimize_for_inference

    torch.set_num_threads(threads)
    model, size, call = build_model(name)
    counts = count(_RawOutputs(model) if name.startswith("tv_ssdlite") else model, size)
    if name.startswith("ours_"):  # run as tools/predict.py runs them: BatchNorm folded, channels-last
        model = optimize_for_inference(model)
    result: dict[str, Any] = {"model": name, "input": size, "params": counts["params"], "madds": counts["madds"]}
    one, eight = torch.randn(1, 3, size, size), torch.randn(8, 3, size, size)
    folder = tempfile.TemporaryDirectory()
    # Export before any eager run: cached anchors made under inference_mode cannot be traced.
    run_onnx = onnx_runner(model, name, size, Path(folder.name), threads) if use_onnx and not name.startswith("tv_ssdlite") else None
    with torch.inference_mode():
        if name.endswith("ssdlite_mobilenetv2") or name.startswith("tv_ssdlite"):  # network alone
            network = _RawOutputs(model)
            result["network_b1"] = latency_stats(timed_runs(lambda: network(one), runs, warmup), 1)
        result["eager_b1"] = latency_stats(timed_runs(lambda: call(model, one), runs, warmup), 1)
        result["eager_b8"] = latency_stats(timed_runs(lambda: call(model, eight), max(3, runs // 4), 1), 8)
    if use_compile:
        try:
            compiled = torch.compile(model)
            with torch.inference_mode():
                result["compile_b1"] = latency_stats(timed_runs(lambda: call(compiled, one), runs, warmup + 2), 1)
        except Exception as error:  # compile support varies by model and platform
            result["compile_b1"] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    if run_onnx is not None:
        result["onnx_b1"] = latency_stats(timed_runs(lambda: run_onnx(one.numpy()), runs, warmup), 1)
        result["onnx_b8"] = latency_stats(timed_runs(lambda: run_onnx(eight.numpy()), max(3, runs // 4), 1), 8)
    folder.cleanup()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


class _RawOutputs(torch.nn.Module):
    """Tensors only, for counting and export: our models' dicts, torchvision's heads."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if hasattr(self.model, "anchor_generator"):  # torchvision SSD: backbone + head, no transform
            features = list(self.model.backbone(images).values())
            outputs = self.model.head(features)
            return outputs["cls_logits"], outputs["bbox_regression"]
        outputs = self.model(images)
        if "cls_logits" in outputs:
            return outputs["cls_logits"], outputs["bbox_regression"], outputs["anchors"]
        return (outputs["out"] if "out" in outputs else outputs["logits"],)


def run_models(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each model in a fresh interpreter (clean caches and a per-model peak memory)."""
    results = []
    for name in MODELS:
        command = [
            sys.executable, __file__, "--model", name, "--runs", str(args.runs), "--warmup", str(args.warmup),
            "--threads", str(args.threads), *(["--compile"] if args.compile else []), *(["--onnx"] if args.onnx else []),
        ]  # fmt: skip
        print(f"  {name} ...", flush=True)
        output = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
        if output.returncode != 0:
            raise RuntimeError(f"benchmark of {name} failed:\n{output.stderr[-2000:]}")
        results.append(json.loads(output.stdout.strip().splitlines()[-1]))
    return results


# ------------------------------------------------------------------------------ train / data
def synthetic_root(folder: Path) -> Path:
    from tasks.data.synthetic import make_coco, make_voc

    if not (folder / "coco" / "annotations").is_dir():
        make_coco(folder / "coco", num_train=160, num_val=8)
    if not (folder / "voc" / "VOCdevkit").is_dir():
        make_voc(folder / "voc", num_train=160, num_val=8)
    return folder


SYNTHETIC_CONFIGS = {
    "detection": ROOT / "configs" / "ssdlite_mobilenetv2_synthetic.yaml",
    "segmentation": ROOT / "configs" / "deeplabv3_mobilenetv2_synthetic.yaml",
}


def instantiate(spec: dict[str, Any], **overrides: Any) -> Any:
    """Build a config's ``class_path`` / ``init_args`` entry, as LightningCLI does for plain values."""
    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**{**spec.get("init_args", {}), **overrides})


def task_and_data(task: str, root: Path, batch_size: int | None, workers: int | None) -> tuple[Any, Any]:
    """The synthetic config's model and data module (its sizes, batch and workers unless given)."""
    config = yaml.safe_load(SYNTHETIC_CONFIGS[task].read_text())
    overrides: dict[str, Any] = {"root": str(root / ("coco" if task == "detection" else "voc"))}
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    if workers is not None:
        overrides["num_workers"] = workers
    data = instantiate(config["data"], **overrides)
    return instantiate(config["model"]), data


def bench_data(task: str, root: Path, batch_size: int | None, workers: int | None, steps: int) -> dict[str, Any]:
    """Images per second of the training DataLoader alone (after its first batch)."""
    _, data = task_and_data(task, root, batch_size, workers)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    next(loader)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        try:
            batch = next(loader)
        except StopIteration:
            loader = iter(data.train_dataloader())
            batch = next(loader)
        images += batch["images"].shape[0]
    elapsed = time.perf_counter() - start
    return {"task": task, "workers": data.hparams.num_workers, "batch": data.hparams.batch_size, "images_per_s": images / elapsed}


def bench_train(task: str, root: Path, batch_size: int | None, workers: int | None, steps: int) -> dict[str, Any]:
    """Images per second of full Lightning training steps, data loading included."""
    from lightning.pytorch import Callback, Trainer

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_end(self, *args: Any) -> None:
            self.times.append(time.perf_counter())

    model, data = task_and_data(task, root, batch_size, workers)
    timer = StepTimer()
    trainer = Trainer(
        accelerator="cpu", max_steps=steps + 2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    elapsed = timer.times[-1] - timer.times[1]  # the first two steps warm up
    images = data.hparams.batch_size * (len(timer.times) - 2)
    return {"task": task, "workers": data.hparams.num_workers, "batch": data.hparams.batch_size, "images_per_s": images / elapsed}


# ------------------------------------------------------------------------------------- eval
def bench_eval(num_images: int = 5000, detections_per_image: int = 100, masks: int = 1000) -> list[dict[str, Any]]:
    """COCO evaluation per backend, and mIoU accumulation over 513x513 masks."""
    from tasks.evaluation.coco_map import evaluate_detections
    from tasks.evaluation.miou import MeanIoU

    rng = np.random.default_rng(0)
    categories = [{"id": i, "name": f"class{i}"} for i in (1, 3, 7, 12, 44)]
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        boxes = np.concatenate([rng.uniform(0, 400, (7, 2)), rng.uniform(8, 200, (7, 2))], axis=1)
        for box in boxes:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(rng.choice([1, 3, 7, 12, 44])),
                "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": 0,
            })  # fmt: skip
        noisy = np.repeat(boxes, int(np.ceil(detections_per_image / len(boxes))), axis=0)[:detections_per_image]
        noisy = noisy + rng.normal(0, 6, noisy.shape)
        noisy[:, 2:] = np.abs(noisy[:, 2:]) + 1
        for box, score in zip(noisy, rng.random(detections_per_image)):
            results.append({"image_id": image_id, "category_id": int(rng.choice([1, 3, 7, 12, 44])), "bbox": box.tolist(), "score": float(score)})
    gt = {"images": images, "annotations": annotations, "categories": categories}
    rows = []
    for backend in ("pycocotools", "faster"):
        start = time.perf_counter()
        summary = evaluate_detections(gt, results, backend=backend)
        rows.append({"what": f"COCO eval {num_images}x{detections_per_image} ({backend})", "seconds": time.perf_counter() - start, "AP": summary["AP"]})
    metric = MeanIoU(21)
    target = torch.from_numpy(rng.integers(0, 21, (masks, 513, 513), dtype=np.int64))
    prediction = torch.from_numpy(rng.integers(0, 21, (masks, 513, 513), dtype=np.int64))
    start = time.perf_counter()
    for index in range(masks):
        metric.update(prediction[index], target[index])
    metric.compute()
    rows.append({"what": f"mIoU accumulation {masks} masks 513x513", "seconds": time.perf_counter() - start})
    return rows


# ------------------------------------------------------------------------------ convergence
def bench_convergence(
    config: Path, data_root: Path | None, out: Path, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """Train ``config`` from scratch through the real CLI and read its validation curve back.

    ``extra`` are more command-line options for ``tools/train.py fit`` (the tests shrink the run).
    """
    command = [
        sys.executable, str(ROOT / "tools" / "train.py"), "fit", "--config", str(config),
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
        *(["--data.root", str(data_root)] if data_root else []), *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    metrics = max(out.glob("*/version_*/metrics.csv"), key=lambda path: path.stat().st_mtime)
    with metrics.open(newline="") as file:
        rows = list(csv.DictReader(file))
    curve = [
        {"step": int(row["step"]) + 1, **{name: float(row[key]) for key, name in CURVE_KEYS.items() if row.get(key)}}
        for row in rows
        if any(row.get(key) for key in CURVE_KEYS)
    ]  # Lightning logs validation at the index of the last step; +1 = optimiser steps taken
    return {"config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config), "seconds": seconds, "curve": curve}


# ------------------------------------------------------------------------------------ report
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_implementation()} {platform.python_version()}"


def format_report(report: dict[str, Any]) -> str:
    """Markdown tables, ready for the README."""
    lines = [f"Machine: {report['machine']}; {report['threads']} threads.", ""]
    if report.get("models"):
        backends = [b for b in ("eager", "compile", "onnx") if any(f"{b}_b1" in r for r in report["models"])]
        header = "| model | input | params | mult-adds | network alone b1 ms | " + " | ".join(
            f"{b} b1 ms (IQR) | {b} b8 img/s" for b in backends
        ) + " | peak RSS MB |"
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        for r in report["models"]:
            cells = [r["model"], str(r["input"]), f"{r['params'] / 1e6:.2f}M", f"{r['madds'] / 1e9:.2f}B"]
            cells.append(f"{r['network_b1']['median_ms']:.1f}" if "network_b1" in r else "-")
            for b in backends:
                b1, b8 = r.get(f"{b}_b1"), r.get(f"{b}_b8")
                cells.append("-" if not b1 or "error" in b1 else f"{b1['median_ms']:.1f} ({b1['q25_ms']:.1f}-{b1['q75_ms']:.1f})")
                cells.append("-" if not b8 or "error" in b8 else f"{b8['images_per_s']:.1f}")
            cells.append(f"{r['peak_rss_mb']:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    rows = report.get("train", []) + report.get("data", [])
    if rows:
        lines += ["| task | what | batch | workers | img/s |", "|---|---|---|---|---|"]
        for name in ("train", "data"):
            for r in report.get(name, []):
                what = "training step (data included)" if name == "train" else "data pipeline alone"
                lines.append(f"| {r['task']} | {what} | {r['batch']} | {r['workers']} | {r['images_per_s']:.1f} |")
        lines.append("")
    if report.get("eval"):
        lines += ["| evaluation | seconds |", "|---|---|"]
        lines += [f"| {r['what']} | {r['seconds']:.2f} |" for r in report["eval"]]
        lines.append("")
    if report.get("convergence"):
        run = report["convergence"]
        names = [n for n in CURVE_KEYS.values() if any(n in point for point in run["curve"])]
        lines += [f"{run['config']} from scratch, {run['seconds'] / 60:.1f} min:", ""]
        lines += ["| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {p['step']} | " + " | ".join(f"{p[n]:.3f}" for n in names) + " |" for p in run["curve"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS + ON_REQUEST)}"
    )
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch / ORT threads")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per latency measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--onnx", action="store_true", help="also time ONNX Runtime")
    parser.add_argument("--steps", type=int, default=20, help="steps for the train and data sections")
    parser.add_argument("--batch-size", type=int, help="batch for train and data (default: the synthetic configs')")
    parser.add_argument("--workers", type=int, help="DataLoader workers for train and data (default: the configs')")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "benchmark", help="synthetic data folder")
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "benchmark.json", help="where to write JSON")
    parser.add_argument(
        "--convergence-config", type=Path, default=SYNTHETIC_CONFIGS["detection"], help="config the convergence section trains"
    )
    parser.add_argument("--convergence-data", type=Path, help="its --data.root (default: the config's)")
    parser.add_argument("--model", help=argparse.SUPPRESS)  # internal: measure one model, print JSON
    args = parser.parse_args(argv)
    if args.model:
        print(json.dumps(bench_model(args.model, args.runs, args.warmup, args.threads, args.compile, args.onnx)))
        return {}
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - set(SECTIONS + ON_REQUEST)
    if unknown:
        parser.error(f"--only: unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS + ON_REQUEST)}")
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"machine": machine(), "threads": args.threads}
    if "models" in sections:
        print("models:", flush=True)
        report["models"] = run_models(args)
    if "train" in sections or "data" in sections:
        root = synthetic_root(args.data)
        for section, bench in (("data", bench_data), ("train", bench_train)):
            if section in sections:
                print(f"{section}:", flush=True)
                report[section] = [bench(t, root, args.batch_size, args.workers, args.steps) for t in ("detection", "segmentation")]
    if "eval" in sections:
        print("eval:", flush=True)
        report["eval"] = bench_eval()
    if "convergence" in sections:
        print(f"convergence: training {args.convergence_config} ...", flush=True)
        out = ROOT / "runs" / "benchmark_convergence"
        report["convergence"] = bench_convergence(args.convergence_config, args.convergence_data, out)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
