"""Precise BatchNorm: exact averages, frozen layers untouched, training itself unchanged."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch import nn

from tasks.data.voc import VOCSegmentationDataModule
from tasks.networks import DeepLabV3MobileNetV2
from tasks.optimization import AdamW
from tasks.precise_bn import PreciseBatchNorm, preserved_rng_states, update_bn_stats
from tasks.segmentation import DeepLabV3Segmentation


def test_update_bn_stats_gives_the_average_of_the_batches_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.1), nn.ReLU()).train()
    batches = [torch.randn(2, 3, 8, 8) * (1 + i) + i for i in range(5)]
    features = [model[0](batch).detach() for batch in batches]
    expected_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    expected_var = torch.stack([f.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for f in features]).mean(0)

    assert update_bn_stats(model, iter(batches)) == 5
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, expected_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, expected_var, rtol=1e-5, atol=1e-5)
    assert bn.momentum == 0.1  # restored


def test_update_bn_stats_leaves_frozen_batchnorm_and_empty_input_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).train()
    model[1].eval()  # a frozen layer (freeze_bn, frozen stages)
    frozen_mean = model[1].running_mean.clone()
    update_bn_stats(model, iter([torch.randn(2, 3, 8, 8) + 5]))
    assert torch.equal(model[1].running_mean, frozen_mean)
    assert not torch.equal(model[3].running_mean, torch.zeros(4))

    before = model[3].running_mean.clone()
    assert update_bn_stats(model, iter([])) == 0
    assert torch.equal(model[3].running_mean, before)


def test_preserved_rng_states_restores_every_stream() -> None:
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    with preserved_rng_states():
        torch.rand(100), np.random.rand(100), random.random()
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def _fit(root: Path, callbacks: list) -> DeepLabV3Segmentation:
    seed_everything(0)
    model = DeepLabV3Segmentation(
        DeepLabV3MobileNetV2(width_mult=0.35), optimizer=AdamW(lr=1e-3), freeze_bn=False, bn_momentum=0.0
    )
    data = VOCSegmentationDataModule(str(root), crop_size=49, batch_size=2, num_workers=0, val_limit=2)
    trainer = Trainer(
        accelerator="cpu", max_steps=4, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    return model


def test_callback_changes_only_the_statistics_not_the_training(synthetic_voc: Path) -> None:
    # momentum 0: the running averages never move from their initial (0, 1) during training.
    plain = _fit(synthetic_voc, [])
    precise = _fit(synthetic_voc, [PreciseBatchNorm(num_images=6, batch_size=2)])
    plain_params, precise_params = dict(plain.named_parameters()), dict(precise.named_parameters())
    for name, value in plain_params.items():
        assert torch.equal(value, precise_params[name]), f"{name}: training changed"
    means = [(n, b) for n, b in precise.named_buffers() if n.endswith("running_mean")]
    assert means and all(torch.equal(dict(plain.named_buffers())[n], torch.zeros_like(b)) for n, b in means)
    assert sum(not torch.equal(b, torch.zeros_like(b)) for _, b in means) == len(means)


def test_num_images_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_images must be at least 1"):
        PreciseBatchNorm(num_images=0)
