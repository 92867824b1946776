"""No code runs from a checkpoint: every entry point refuses pickled objects and foreign classes.

A ``.ckpt`` is a pickle. The hostile files here are Lightning-shaped (``state_dict``,
``hyper_parameters`` naming one of our tasks) and carry a payload whose unpickling would create a
marker file; others are plain data but name a class outside the project (``os.system``, a
Lightning demo model) for LightningCLI or ``load_from_checkpoint`` to import and build.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from tasks.checkpoint_io import AtomicCheckpointIO
from tasks.checkpoints import PROJECT_CLASSES, load_task, read_checkpoint, read_hyper_parameters
from tools import export, predict, test
from tools.train import run

ROOT = Path(__file__).resolve().parents[1]
DET_CONFIG = str(ROOT / "configs" / "ssdlite_mobilenetv2_synthetic.yaml")
SEG_CONFIG = str(ROOT / "configs" / "deeplabv3_mobilenetv2_synthetic.yaml")


class Payload:
    """Unpickling calls ``open(marker, "w")``: the file appears if (and only if) the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


NETWORK = {"class_path": "tasks.networks.SSDLiteMobileNetV2", "init_args": {"num_classes": 6}}


def lightning_shaped(**extra: object) -> dict:
    return {
        "epoch": 0,
        "global_step": 1,
        "state_dict": {"network.weight": torch.zeros(2)},
        "hyper_parameters": {"_class_path": "tasks.detection.SSDLiteDetection", "network": NETWORK},
        **extra,
    }


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "payload-ran"


@pytest.fixture
def payload_checkpoint(tmp_path: Path, marker: Path) -> Path:
    path = tmp_path / "hostile.ckpt"
    torch.save(lightning_shaped(callbacks={"x": Payload(marker)}), path)
    return path


@pytest.fixture(autouse=True)
def _command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["tools/train.py"])  # LightningCLI compares with sys.argv


def one_error_line(capsys: pytest.CaptureFixture, path: Path) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], lines
    return lines[0]


def test_the_payload_runs_when_unpickled(marker: Path) -> None:
    """The payload is real: plain unpickling (torch.load without weights_only) runs it."""
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize(
    "tool", [test.main, export.main, predict.main], ids=["test.py", "export.py", "predict.py"]
)
def test_tools_refuse_a_pickle_payload(
    tool, payload_checkpoint: Path, marker: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = {test.main: ["--out", str(tmp_path / "out")], export.main: ["--out", str(tmp_path / "m.onnx")],
            predict.main: [str(tmp_path), "--out", str(tmp_path / "pictures")]}[tool]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        tool([str(payload_checkpoint), *args])
    assert exit_info.value.code == 1
    line = one_error_line(capsys, payload_checkpoint)
    assert "refused" in line and "open" in line  # names what it would have called (io.open)
    assert not marker.exists()


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
def test_train_refuses_a_pickle_payload(
    subcommand: str, payload_checkpoint: Path, marker: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = run([subcommand, "--config", DET_CONFIG, "--data.root", str(tmp_path / "none"),
                "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
                "--ckpt_path", str(payload_checkpoint)])  # fmt: skip
    assert code == 1
    assert "refused" in one_error_line(capsys, payload_checkpoint)
    assert not marker.exists()


def test_checkpoint_io_loads_weights_only_whatever_is_asked(
    payload_checkpoint: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What Lightning's trainer calls to restore ``--ckpt_path``, even with torch's opt-out set."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(Exception, match="Weights only load failed"):
        # A caller asking for a full unpickle is overruled too.
        AtomicCheckpointIO().load_checkpoint(payload_checkpoint, **{"weights_only": False})
    assert not marker.exists()


@pytest.mark.parametrize(
    ("hyper_parameters", "named"),
    [
        ({"_class_path": "os.system"}, "'os.system'"),
        ({"_class_path": "lightning.pytorch.demos.boring_classes.BoringModel"}, "BoringModel"),
        ({"_class_path": "tasks.detection.SSDLiteDetection", "network": {"class_path": "os.system"}}, "'os.system'"),
        ({"_class_path": "tasks.detection.SSDLiteDetection", "network": NETWORK,
          "optimizer": {"class_path": "builtins.eval", "init_args": {}}}, "'builtins.eval'"),
        # Deep inside the network's arguments, and a module that prints when imported: not imported.
        ({"_class_path": "tasks.detection.SSDLiteDetection",
          "network": {"class_path": NETWORK["class_path"], "init_args": {"default_boxes": {"class_path": "this.Zen"}}}},
         "'this.Zen'"),
        ({"_class_path": "tasks.detection.SSDLiteDetection", "_instantiator": "os.system"}, "instantiator 'os.system'"),
        ({"_class_path": ["tasks.detection.SSDLiteDetection"]}, "not one of"),
    ],
    ids=["os.system", "foreign-module", "nested", "nested-optimizer", "nested-deep", "instantiator", "not-a-string"],
)
def test_class_paths_outside_the_project_are_refused(
    hyper_parameters: dict, named: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    already_imported = "this" in sys.modules
    path = tmp_path / "foreign.ckpt"
    torch.save(lightning_shaped(hyper_parameters=hyper_parameters), path)  # plain data: loads weights_only
    for reader in (read_checkpoint, read_hyper_parameters, load_task):
        with pytest.raises(ValueError, match="refused") as error:
            reader(path)
        assert named in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(SystemExit):
        test.main([str(path), "--out", str(tmp_path / "out")])
    assert named in one_error_line(capsys, path)
    assert run(["validate", "--config", DET_CONFIG, "--data.root", str(tmp_path), "--ckpt_path", str(path)]) == 1
    assert named in one_error_line(capsys, path)
    assert already_imported or "this" not in sys.modules


@pytest.mark.parametrize("part", ["network", "optimizer", "lr_schedule"])
def test_a_task_checkpoint_naming_a_foreign_callable_is_refused_by_load_from_checkpoint(
    part: str, detection_checkpoint: Path, tmp_path: Path
) -> None:
    """A checkpoint of a task built in Python (no LightningCLI instantiator): the task rebuilds its
    saved configs itself, through tasks.buildable's allow-list, before anything is called."""
    from tasks.detection import SSDLiteDetection

    marker = tmp_path / "opened"
    checkpoint = torch.load(detection_checkpoint, weights_only=True)
    for key in ("_class_path", "_instantiator"):
        checkpoint["hyper_parameters"].pop(key)
    opener = {"class_path": "builtins.open", "init_args": {"file": str(marker), "mode": "w"}}
    checkpoint["hyper_parameters"][part] = opener
    path = tmp_path / "python.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=rf"^{path}: hyper_parameters: refused: it names the class 'builtins.open'"):
        SSDLiteDetection.load_from_checkpoint(path, weights_only=True)
    with pytest.raises(ValueError, match=rf"^saved {part}: refused: it names the class 'builtins.open'"):
        SSDLiteDetection(**checkpoint["hyper_parameters"])  # the task's own check, behind the file's
    assert not marker.exists()


def test_a_foreign_datamodule_is_refused(detection_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(detection_checkpoint, weights_only=True)
    checkpoint["datamodule_hyper_parameters"]["_class_path"] = "lightning.pytorch.demos.boring_classes.BoringDataModule"
    torch.save(checkpoint, tmp_path / "foreign-data.ckpt")
    with pytest.raises(ValueError, match="refused: the checkpoint names the class 'lightning.pytorch.demos"):
        read_checkpoint(tmp_path / "foreign-data.ckpt")


def test_a_lightning_model_of_another_project_is_not_loaded(tmp_path: Path) -> None:
    """A real, harmless LightningModule saved by the CLI's instantiator is still not ours."""
    model = BoringModel()
    path = tmp_path / "boring.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {"_class_path": f"{BoringModel.__module__}.BoringModel"}}, path)
    with pytest.raises(ValueError, match="is not one of tasks.data.coco"):
        load_task(path)


def test_our_checkpoints_load_weights_only(detection_checkpoint: Path, segmentation_checkpoint: Path) -> None:
    for path in (detection_checkpoint, segmentation_checkpoint):
        checkpoint = torch.load(path, weights_only=True)  # nothing in them needs unpickling code
        assert checkpoint["hyper_parameters"]["_class_path"] in PROJECT_CLASSES
        assert checkpoint["datamodule_hyper_parameters"]["_class_path"] in PROJECT_CLASSES
        assert load_task(path).training is False


def test_train_resumes_our_own_checkpoint_through_the_checks(
    segmentation_checkpoint: Path, synthetic_voc: Path, tmp_path: Path
) -> None:
    code = run(["validate", "--config", SEG_CONFIG, "--data.root", str(synthetic_voc), "--data.num_workers", "0",
                "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path),
                "--trainer.logger.init_args.save_dir", str(tmp_path), "--ckpt_path", str(segmentation_checkpoint)])  # fmt: skip
    assert code == 0


def test_load_from_checkpoint_checks_the_file_before_anything_is_imported(tmp_path: Path) -> None:
    """Lightning hands saved class paths to jsonargparse, which imports them: the task's
    load_from_checkpoint refuses the file first (``this`` prints the Zen of Python on import)."""
    import subprocess
    import sys

    path = tmp_path / "zen.ckpt"
    torch.save(
        {"state_dict": {}, "pytorch-lightning_version": "2.6.6", "hyper_parameters": {
            "_class_path": "tasks.detection.SSDLiteDetection",
            "_instantiator": "lightning.pytorch.cli.instantiate_module",
            "network": {"class_path": "this.Zen"}}},
        path,
    )  # fmt: skip
    code = (
        "import sys\nfrom tasks.detection import SSDLiteDetection\n"
        f"try:\n    SSDLiteDetection.load_from_checkpoint({str(path)!r})\n"
        "except ValueError as error:\n    print('REFUSED', error)\n"
        "print('IMPORTED' if 'this' in sys.modules else 'NOT IMPORTED')\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert "REFUSED" in result.stdout and "'this.Zen'" in result.stdout, result.stderr[-2000:]
    assert "NOT IMPORTED" in result.stdout and "Beautiful is better" not in result.stdout
