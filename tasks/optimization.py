"""Optimiser recipes and learning-rate schedules, given to a task as objects (config ``class_path``).

An optimiser recipe (:class:`SGD`, :class:`RMSProp`, :class:`AdamW`) holds the settings of one
paper's recipe and builds the torch optimiser over the task's parameter groups: weight decay on
conv/linear weights only, never on BatchNorm parameters or biases. A schedule
(:class:`WarmupCosine`, :class:`WarmupExponential`, :class:`Poly`) maps an optimiser step to a
learning-rate factor, stepped every optimiser step.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from tasks.buildable import Buildable


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable weights with ``weight_decay``; BatchNorm parameters and biases (all 1-d) without."""
    decay, no_decay = [], []
    for parameter in module.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim > 1 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class OptimizerRecipe(Buildable, ABC):
    """Base of the optimiser recipes: ``lr`` (for ``lr_reference_batch`` images, see
    :mod:`tasks.lr_scaling`) and ``weight_decay`` (on weights only)."""

    def __init__(self, lr: float, weight_decay: float = 4e-5) -> None:
        self.lr = lr
        self.weight_decay = weight_decay

    @abstractmethod
    def build(self, module: nn.Module, lr: float) -> torch.optim.Optimizer:
        """The optimiser over ``module``'s parameter groups at learning rate ``lr`` (already scaled)."""

    def groups(self, module: nn.Module) -> list[dict]:
        return parameter_groups(module, self.weight_decay)


class SGD(OptimizerRecipe):
    """SGD with momentum: torchvision's SSDLite recipe (0.15 for batch 192) and TF DeepLab's
    (0.007 for batch 16)."""

    def __init__(self, lr: float = 0.15, momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 4e-5) -> None:
        super().__init__(lr, weight_decay)
        self.momentum = momentum
        self.nesterov = nesterov

    def build(self, module: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.groups(module), lr=lr, momentum=self.momentum, nesterov=self.nesterov)


class RMSProp(OptimizerRecipe):
    """The TF Object Detection API's SSDLite recipe: RMSProp with decay ``alpha`` 0.9, momentum
    0.9 and ``eps`` 1.0.

    TF's RMSProp puts epsilon inside the square root and starts its mean square at 1; with TF's
    eps = 1.0 both start as momentum SGD at about ``lr``, as here.
    """

    def __init__(
        self, lr: float = 0.004, alpha: float = 0.9, eps: float = 1.0, momentum: float = 0.9, weight_decay: float = 4e-5
    ) -> None:
        super().__init__(lr, weight_decay)
        self.alpha = alpha
        self.eps = eps
        self.momentum = momentum

    def build(self, module: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.RMSprop(self.groups(module), lr=lr, alpha=self.alpha, eps=self.eps, momentum=self.momentum)


class AdamW(OptimizerRecipe):
    """AdamW (decoupled weight decay, default betas): leaves the "predict the prior everywhere"
    plateau much sooner than SGD when training from scratch on a small budget."""

    def __init__(self, lr: float = 0.004, weight_decay: float = 4e-5) -> None:
        super().__init__(lr, weight_decay)

    def build(self, module: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.groups(module), lr=lr)


class Schedule(Buildable, ABC):
    """A learning-rate factor per optimiser step, given the run's total steps."""

    @abstractmethod
    def __call__(self, step: int, total_steps: int) -> float:
        """The factor by which the recipe's lr is multiplied at optimiser step ``step``."""

    @property
    def needs_total_steps(self) -> bool:
        """Whether the factor depends on the run's length (then the run must be finite)."""
        return False


class Warmup:
    """Linear warm-up from ``factor`` to 1 over ``steps`` (Goyal et al., 2017)."""

    def __init__(self, steps: int, factor: float) -> None:
        self.steps = steps
        self.factor = factor

    def __call__(self, step: int) -> float:
        if step >= self.steps:
            return 1.0
        return self.factor + (1 - self.factor) * step / self.steps


class WarmupCosine(Schedule):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` at the last step (torchvision's SSDLite)."""

    def __init__(self, warmup_steps: int = 1000, warmup_factor: float = 0.001, min_lr_ratio: float = 0.0) -> None:
        self.warmup = Warmup(warmup_steps, warmup_factor)
        self.min_lr_ratio = min_lr_ratio

    @property
    def needs_total_steps(self) -> bool:
        return True

    def __call__(self, step: int, total_steps: int) -> float:
        span = max(1, total_steps - self.warmup.steps)
        progress = min(1.0, max(0, step - self.warmup.steps) / span)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.warmup(step) * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


class WarmupExponential(Schedule):
    """Linear warm-up, then TF's staircase decay ``decay_rate ** (step // decay_steps)``."""

    def __init__(
        self, decay_rate: float = 0.95, decay_steps: int = 800720, warmup_steps: int = 0, warmup_factor: float = 0.001
    ) -> None:
        self.decay_rate = decay_rate
        self.decay_steps = decay_steps
        self.warmup = Warmup(warmup_steps, warmup_factor)

    def __call__(self, step: int, total_steps: int) -> float:
        return self.warmup(step) * self.decay_rate ** (step // self.decay_steps)


class Poly(Schedule):
    """DeepLab's "poly" policy: ``(1 - step / max_steps) ** power``; ``max_steps`` None: the run's."""

    def __init__(self, power: float = 0.9, max_steps: int | None = None) -> None:
        self.power = power
        self.max_steps = max_steps

    @property
    def needs_total_steps(self) -> bool:
        return self.max_steps is None

    def __call__(self, step: int, total_steps: int) -> float:
        steps = self.max_steps if self.max_steps is not None else total_steps
        return (1.0 - min(step, steps) / steps) ** self.power


def lr_lambda(schedule: Schedule, total_steps: float) -> Callable[[int], float]:
    """``schedule`` as ``LambdaLR``'s ``lr_lambda`` for a run of ``total_steps`` optimiser steps.

    Raises:
        ValueError: the schedule needs the run's length and the run has none (no max_steps /
            max_epochs), or the length is below 1.
    """
    if schedule.needs_total_steps and not math.isfinite(total_steps):
        raise ValueError(
            f"the {type(schedule).__name__} schedule needs a finite run: set trainer.max_steps or trainer.max_epochs"
        )
    steps = int(total_steps) if math.isfinite(total_steps) else 0
    if schedule.needs_total_steps and steps < 1:
        raise ValueError(f"the {type(schedule).__name__} schedule needs at least 1 step, got {steps}")
    return lambda step: schedule(step, steps)
