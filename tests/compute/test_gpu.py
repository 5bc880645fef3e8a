"""Hardware probe: CPU fallback without CUDA, measured TFLOPS, and the data-directory cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from p2pcompute.compute.gpu import CACHE_FILE, HardwareReport, load_or_probe, probe
from p2pcompute.core.messages import DeviceKind
from p2pcompute.errors import ConfigError


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; the CUDA path is checked on a GPU host")
def test_probe_falls_back_to_cpu() -> None:
    report = probe(benchmark=True)
    assert len(report.devices) == 1
    cpu = report.devices[0]
    assert cpu.kind is DeviceKind.CPU
    assert cpu.name
    assert cpu.cores >= 1
    assert 0 < cpu.free_memory_bytes <= cpu.memory_bytes
    assert cpu.tflops > 0
    assert cpu.compute_capability == ""
    assert report.software.torch == torch.__version__
    assert report.software.cuda == ""
    assert report.driver == ""


def test_report_json_round_trip() -> None:
    report = probe(benchmark=False)
    assert HardwareReport.from_json(json.loads(json.dumps(report.to_json()))) == report


def test_load_or_probe_caches_in_data_dir(tmp_path: Path) -> None:
    first = load_or_probe(tmp_path, benchmark=False)
    assert (tmp_path / CACHE_FILE).exists()
    assert load_or_probe(tmp_path) == first  # read back, not probed again
    refreshed = load_or_probe(tmp_path, refresh=True, benchmark=False)
    assert refreshed.probed_at > first.probed_at


def test_damaged_cache_is_replaced(tmp_path: Path) -> None:
    (tmp_path / CACHE_FILE).write_text('{"devices": 1}')
    report = load_or_probe(tmp_path, benchmark=False)
    assert report.devices
    with pytest.raises(ConfigError):
        HardwareReport.from_json({"devices": 1})
