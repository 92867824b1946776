"""Quantisation-aware fine-tuning (QAT) of a trained task, for when post-training INT8 loses too much.

``tools/export.py CHECKPOINT --out model.onnx --int8 --qat-steps N`` runs it before the export:

1. :func:`prepare_network`: the task's network captured by ``torch.export`` in training mode and
   prepared by torchao's PT2E QAT (``prepare_qat_pt2e``) with its x86 quantiser's QAT settings:
   per-channel symmetric int8 weights and uint8 activations, what ONNX Runtime's QDQ quantiser
   (:mod:`tasks.quantization`) writes; each convolution's BatchNorm is folded into it inside the
   fake-quant graph, so the weights learn the grid they will be rounded to;
2. :class:`QuantizationAwareFineTune`: a short Lightning fine-tune of that graph on the task's own
   training data and loss (:meth:`tasks.training.DenseTask.training_losses`), SGD with momentum at
   a small learning rate decayed to zero (cosine), BatchNorm statistics frozen by default
   (:func:`freeze_batch_norm_statistics`);
3. :func:`copy_weights_back`: the fine-tuned weights and BatchNorm statistics written back into the
   task's float network, parameter by parameter (the captured graph keeps the module's names);
4. then the same export as without QAT: float ONNX, ONNX Runtime's static quantisation calibrated
   on training images, the parity report. The activation ranges come from that calibration, the
   weights from the fine-tune.

torchao's own conversion (``convert_pt2e``) is not the shipped path: ONNX Runtime's quantised file
is, so QAT and post-training quantisation ship one kind of file, checked and evaluated alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch import Tensor, nn

TORCHAO_BN_EPS = 1e-5  # what torchao's QAT conv + BatchNorm pattern uses, whatever the layer's eps
LEARNING_RATE = 1e-4  # a fine-tune of trained weights: a fraction of the training rates
MOMENTUM = 0.9


def match_batch_norm_eps(network: nn.Module, eps: float = TORCHAO_BN_EPS) -> int:
    """Give every BatchNorm of ``network`` the ``eps`` torchao's QAT graph computes with, changing
    nothing in evaluation: the running variance takes the difference (``var + old = var' + eps``).
    Returns how many layers changed.

    torchao's conv + BatchNorm QAT pattern hard-codes ``eps = 1e-5`` (``qat_utils.py``, "TODO:
    allow setting eps"); the SSDLite head's BatchNorms use TensorFlow's 1e-3, and without this
    their fake-quant graph would normalise with another variance than the network it was made from.
    """
    changed = 0
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.eps != eps:
                if module.running_var is not None:
                    module.running_var.add_(module.eps - eps)
                module.eps = eps
                changed += 1
    return changed


def prepare_network(network: nn.Module, example: Tensor) -> torch.fx.GraphModule:
    """``network`` (in training mode) captured at ``example``'s shape (the batch size dynamic) and
    prepared for QAT: a graph module with fake quantisation of weights and activations.

    Raises:
        ValueError: when ``torch.export`` cannot capture the network (the message says why).
    """
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    match_batch_norm_eps(network)
    network.train()
    batch = torch.export.Dim("batch", min=1, max=1024)
    try:
        captured = torch.export.export(network, (example,), dynamic_shapes=({0: batch},)).module()
    except Exception as error:  # torch.export raises many kinds; one line says which
        raise ValueError(f"QAT: torch.export cannot capture {type(network).__name__}: {error}") from error
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    # Multiplications stay float, as in ONNX Runtime's file: ours are the default boxes' geometry.
    quantizer.set_function_type_qconfig(torch.mul, None)
    return prepare_qat_pt2e(captured, quantizer)


def fake_quantizers(prepared: nn.Module) -> list[nn.Module]:
    """The fake-quantisation modules of a prepared graph (weights and activations)."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    return [module for module in prepared.modules() if isinstance(module, FakeQuantizeBase)]


def copy_weights_back(prepared: nn.Module, network: nn.Module) -> int:
    """Write the prepared graph's parameters and buffers into ``network`` (same names); return
    how many tensors were copied. Buffers the graph does not hold (used only by the loss or the
    post-processing, such as detection's label mask) are left as they are: the fine-tune cannot
    have changed them.

    Raises:
        ValueError: a parameter of ``network`` the graph lacks or holds in another shape.
    """
    source = prepared.state_dict()
    target = network.state_dict()
    missing = [name for name, _ in network.named_parameters() if name not in source]
    reshaped = [name for name in target if name in source and source[name].shape != target[name].shape]
    if missing or reshaped:
        names = [*missing, *reshaped]
        raise ValueError(f"QAT: the fine-tuned graph lacks {len(names)} of the network's parameters, e.g. {names[:3]}")
    copied = {name: source[name] for name in target if name in source}
    with torch.no_grad():
        network.load_state_dict(copied, strict=False)
    return len(copied)


class QuantizationAwareFineTune(LightningModule):
    """Fine-tunes ``prepared`` (:func:`prepare_network` of ``task.network``) on ``task``'s
    training loss for ``steps`` optimiser steps.

    Args:
        task: the trained task; its network is not trained here (see :func:`copy_weights_back`).
        prepared: the fake-quant graph of its network.
        steps: optimiser steps (the cosine schedule reaches zero there).
        lr: the starting learning rate of SGD with momentum.
    """

    def __init__(self, task: LightningModule, prepared: nn.Module, steps: int, lr: float = LEARNING_RATE) -> None:
        super().__init__()
        self.prepared = prepared
        object.__setattr__(self, "task", task)  # not a submodule: its loss only
        self.steps = steps
        self.lr = lr

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        losses = self.task.training_losses(self.prepared(batch["images"]), batch)
        self.log("qat/loss", losses["loss"], prog_bar=True, batch_size=batch["images"].shape[0])
        return losses["loss"]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.SGD(self.prepared.parameters(), lr=self.lr, momentum=MOMENTUM)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, self.steps) / self.steps))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def example_batch(datamodule: LightningDataModule) -> Tensor:
    """The first training batch's images: the shape the network is captured at."""
    return next(iter(datamodule.train_dataloader()))["images"]


def freeze_batch_norm_statistics(prepared: torch.fx.GraphModule) -> None:
    """Make the prepared graph's BatchNorms normalise with their running statistics and stop
    updating them (dropout off too), while every weight, BatchNorm's scale and shift included,
    still trains: a short fine-tune of a trained model should not move statistics that were
    estimated on many more images (the synthetic detectors' were re-estimated on 256)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval

    move_exported_model_to_eval(prepared)


def finetune(
    task: LightningModule,
    datamodule: LightningDataModule,
    steps: int,
    lr: float = LEARNING_RATE,
    progress: bool = True,
    *,
    update_batch_norm: bool = False,
) -> dict[str, float]:
    """Quantisation-aware fine-tuning of ``task``'s network in place (see the module docs).

    ``update_batch_norm``: let the BatchNorms normalise with batch statistics and update their
    running ones, as in training; by default they are frozen (:func:`freeze_batch_norm_statistics`).

    Returns:
        ``steps``, ``lr``, ``batch_norm`` (``"frozen"`` or ``"updated"``), ``fake_quantizers``
        (their count) and ``loss`` (the last step's).

    Raises:
        ValueError: ``steps`` below 1, or a network torch.export cannot capture.
    """
    if steps < 1:
        raise ValueError(f"QAT needs at least one step, got --qat-steps {steps}")
    datamodule.setup("fit")
    prepared = prepare_network(task.network, example_batch(datamodule))
    if not update_batch_norm:
        freeze_batch_norm_statistics(prepared)
    module = QuantizationAwareFineTune(task, prepared, steps, lr)
    trainer = Trainer(
        max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=progress, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    copy_weights_back(prepared, task.network)
    task.network.eval()
    loss = trainer.callback_metrics.get("qat/loss")
    return {
        "steps": steps, "lr": lr, "batch_norm": "updated" if update_batch_norm else "frozen",
        "fake_quantizers": len(fake_quantizers(prepared)),
        "loss": float(loss) if loss is not None else math.nan,
    }  # fmt: skip
