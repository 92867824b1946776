"""The learning rate for the batch a run really uses: the linear scaling rule.

A config states ``lr`` for a reference batch (torchvision's SSDLite: 0.15 for 8 GPUs x 24 = 192;
TF DeepLab: 0.007 for 16). The batch one optimiser step really averages is ``batch_size`` (per
device, from the DataModule) x ``world_size`` (devices x nodes) x ``accumulate_grad_batches``;
the lr is scaled by its ratio to the reference (Goyal et al. 2017, "Accurate, Large Minibatch
SGD", section 2.1), so the same config trains on 1 GPU or 64 without hand-edited learning rates.
Both tasks call :func:`scaled_lr` in ``configure_optimizers``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def effective_batch_size(trainer: Any) -> tuple[int, str] | None:
    """Images per optimiser step and how they add up, or None when the DataModule has no batch size.

    The per-device batch is the trainer's DataModule ``batch_size`` (or its ``hparams``').
    """
    datamodule = getattr(trainer, "datamodule", None)
    batch_size = getattr(datamodule, "batch_size", None)
    if batch_size is None:
        batch_size = dict(getattr(datamodule, "hparams", None) or {}).get("batch_size")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        return None
    world_size = int(getattr(trainer, "world_size", 1))
    accumulate = int(getattr(trainer, "accumulate_grad_batches", 1))
    how = f"{batch_size} per device x {world_size} devices x {accumulate} accumulated batches"
    return batch_size * world_size * accumulate, how


def scaled_lr(lr: float, reference_batch: int | None, trainer: Any) -> float:
    """``lr * effective batch / reference_batch``; ``lr`` itself when ``reference_batch`` is None.

    Logs the value used once (rank zero). Without a trainer DataModule that states its
    ``batch_size`` the lr cannot be scaled: a warning says so and ``lr`` is used as given.
    """
    if reference_batch is None:
        return lr
    if reference_batch < 1:
        raise ValueError(f"lr_reference_batch must be >= 1 or null, got {reference_batch}")
    effective = effective_batch_size(trainer) if trainer is not None else None
    if effective is None:
        rank_zero_warn(
            f"lr_reference_batch={reference_batch} but the trainer has no DataModule with a batch_size: "
            f"lr {lr:g} is used unscaled"
        )
        return lr
    batch, how = effective
    used = lr * batch / reference_batch
    rank_zero_info(
        f"learning rate {used:g} = lr {lr:g} x effective batch {batch} ({how}) / lr_reference_batch {reference_batch}"
    )
    return used
