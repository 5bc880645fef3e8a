"""Hardware probe: what this machine offers, and how fast it really is.

Each CUDA device (name, memory, compute capability, SM count) or, without CUDA, the CPU (model, cores,
RAM), plus a short fp32 matmul micro-benchmark per device giving measured TFLOPS. Importing torch
costs ~200 MB and seconds, so a peer's network process never does it: it runs
``python -m p2pcompute.compute.gpu --json`` once in a child process and caches the report in its data
directory (:func:`load_or_probe`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from p2pcompute import __version__
from p2pcompute.config import PROBE_TIMEOUT_S
from p2pcompute.core.messages import Device, DeviceKind, Software
from p2pcompute.errors import ConfigError

__all__ = ["HardwareReport", "load_or_probe", "probe"]

log = logging.getLogger(__name__)

CACHE_FILE = "hardware.json"
_CPU_MATMUL_N = 512
_CUDA_MATMUL_N = 4096
_BENCH_MIN_SECONDS = 0.2


@dataclass(frozen=True, slots=True)
class HardwareReport:
    devices: tuple[Device, ...]
    software: Software
    driver: str  # NVIDIA driver version, "" without CUDA
    probed_at: float  # Unix seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "devices": [{**asdict(d), "kind": d.kind.value} for d in self.devices],
            "software": asdict(self.software),
            "driver": self.driver,
            "probed_at": self.probed_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HardwareReport:
        try:
            devices = tuple(Device(**{**d, "kind": DeviceKind(d["kind"])}) for d in data["devices"])
            return cls(
                devices=devices,
                software=Software(**data["software"]),
                driver=str(data["driver"]),
                probed_at=float(data["probed_at"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"hardware cache is damaged: {exc}") from exc


def _matmul_tflops(torch: Any, device: str, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.float32)
    b = torch.randn(n, n, device=device, dtype=torch.float32)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    (a @ b).sum().item()  # warm-up (kernel selection, allocation)
    sync()
    iterations = 0
    start = time.perf_counter()
    while True:
        a @ b
        iterations += 1
        if iterations % 4 == 0:
            sync()
            if time.perf_counter() - start >= _BENCH_MIN_SECONDS:
                break
    elapsed = time.perf_counter() - start
    return round(2 * n**3 * iterations / elapsed / 1e12, 4)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()[:128]
    except OSError:
        pass
    return (platform.processor() or platform.machine() or "unknown CPU")[:128]


def _memory_bytes() -> tuple[int, int]:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    free = total
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return total, min(free, total)


def _nvidia_driver() -> str:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ""
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.splitlines()[0].strip() if out.strip() else ""


def probe(*, benchmark: bool = True) -> HardwareReport:
    """Probe this machine (imports torch). CUDA devices if any, else the CPU."""
    import torch

    devices: list[Device] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            devices.append(
                Device(
                    kind=DeviceKind.CUDA,
                    name=props.name[:128],
                    memory_bytes=int(total),
                    free_memory_bytes=int(free),
                    tflops=_matmul_tflops(torch, f"cuda:{i}", _CUDA_MATMUL_N) if benchmark else 0.0,
                    compute_capability=f"{props.major}.{props.minor}",
                    cores=int(props.multi_processor_count),
                )
            )
    else:
        total, free = _memory_bytes()
        devices.append(
            Device(
                kind=DeviceKind.CPU,
                name=_cpu_model(),
                memory_bytes=total,
                free_memory_bytes=free,
                tflops=_matmul_tflops(torch, "cpu", _CPU_MATMUL_N) if benchmark else 0.0,
                compute_capability="",
                cores=os.cpu_count() or 1,
            )
        )
    software = Software(
        p2pcompute=__version__,
        torch=torch.__version__[:64],
        cuda=(torch.version.cuda or "")[:32],
        python=platform.python_version(),
    )
    return HardwareReport(
        devices=tuple(devices),
        software=software,
        driver=_nvidia_driver() if devices[0].kind is DeviceKind.CUDA else "",
        probed_at=time.time(),
    )


def load_or_probe(
    data_dir: Path, *, refresh: bool = False, benchmark: bool = True, timeout: float = PROBE_TIMEOUT_S
) -> HardwareReport:
    """The cached report in ``data_dir``, or a fresh one from a child process (torch stays out of this one).

    The cache is refreshed when asked, when damaged, or when the p2pcompute version changed.
    """
    cache = data_dir / CACHE_FILE
    if cache.exists() and not refresh:
        try:
            report = HardwareReport.from_json(json.loads(cache.read_text()))
        except (ConfigError, json.JSONDecodeError) as exc:
            log.warning("re-probing hardware: %s", exc)
        else:
            if report.software.p2pcompute == __version__:
                return report
    log.info("probing hardware (torch import and a short matmul benchmark)")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "p2pcompute.compute.gpu", "--json", *([] if benchmark else ["--no-benchmark"])],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        ).stdout
    except subprocess.CalledProcessError as exc:
        raise ConfigError(f"hardware probe failed: {exc.stderr.strip()[-500:]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(f"hardware probe took longer than {timeout} s") from exc
    report = HardwareReport.from_json(json.loads(out))
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=2))
    tmp.replace(cache)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description="Probe this machine's compute devices.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-benchmark", action="store_true", help="skip the matmul benchmark")
    args = parser.parse_args()
    report = probe(benchmark=not args.no_benchmark)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        for d in report.devices:
            print(f"{d.kind.value}: {d.name}  {d.memory_bytes / 2**30:.1f} GiB  {d.tflops} TFLOPS  cores={d.cores}")
        print(f"torch {report.software.torch}  cuda {report.software.cuda or '-'}  driver {report.driver or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
