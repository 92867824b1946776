"""The tools' quiet start: third-party deprecation warnings and Lightning's adverts hidden, the rest kept."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator

import pytest
from lightning.pytorch.utilities import rank_zero_info

from tasks.startup import ADVERT_LOGGERS, quiet_startup


@pytest.fixture
def restored_startup_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """quiet_startup changes process-wide state: give it back after the test."""
    monkeypatch.delenv("NO_ALBUMENTATIONS_UPDATE", raising=False)
    filters = {name: list(logging.getLogger(name).filters) for name in ADVERT_LOGGERS}
    yield
    for name, kept in filters.items():
        logging.getLogger(name).filters[:] = kept


def emitted(category: type[Warning], module: str) -> bool:
    """Whether a warning of ``category`` attributed to ``module`` gets through the filters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("a message", category, filename=f"{module.replace('.', '/')}.py", lineno=1, module=module)
    return bool(caught)


def test_third_party_deprecations_are_hidden_and_everything_else_kept(restored_startup_state: None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        cases = [
            (FutureWarning, "lightning.pytorch.utilities._pytree"),  # torch's LeafSpec, raised inside Lightning
            (FutureWarning, "torch.jit._serialization"),
            (DeprecationWarning, "torchvision.transforms.functional"),
            (DeprecationWarning, "albumentations.core.transforms_interface"),
            (FutureWarning, "tasks.training"),
            (UserWarning, "lightning.pytorch.loops.fit_loop"),
            (FutureWarning, "torchvision_extra"),  # another package, not a torchvision module
        ]
        before = [emitted(category, module) for category, module in cases]
        quiet_startup()
        after = [emitted(category, module) for category, module in cases]
    assert before == [True] * len(cases)  # the filters below are quiet_startup's doing
    assert after == [False, False, False, False, True, True, True]
    assert os.environ["NO_ALBUMENTATIONS_UPDATE"] == "1"  # no PyPI request at import


def test_lightning_adverts_are_dropped_and_its_other_lines_kept(
    restored_startup_state: None, caplog: pytest.LogCaptureFixture
) -> None:
    advert = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)"
    with caplog.at_level(logging.INFO):
        rank_zero_info(advert)
        quiet_startup()
        quiet_startup()  # twice: one filter
        rank_zero_info(advert)
        rank_zero_info("GPU available: False, used: False")
    assert [record.getMessage() for record in caplog.records] == [advert, "GPU available: False, used: False"]
    assert all(len(logging.getLogger(name).filters) == 1 for name in ADVERT_LOGGERS)
