"""The default intra-op thread count (--threads)."""

from __future__ import annotations

import pytest
import torch

from flatcli.errors import UsageError
from flatcli.runtime import TINY_MODEL_PARAMS, cpu_count, default_threads, set_threads


def test_cores_are_split_between_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("flatcli.runtime.cpu_count", lambda: 16)
    assert default_threads() == 16
    assert default_threads(processes=4) == 4
    assert default_threads(processes=32) == 1
    assert default_threads(params=TINY_MODEL_PARAMS - 1) == 1
    assert default_threads(params=TINY_MODEL_PARAMS) == 16


def test_omp_num_threads_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(processes=8, params=10) == 3


def test_set_threads_sets_torch_and_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads(None, processes=2) == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UsageError):
        set_threads(0)
    assert cpu_count() >= 1
