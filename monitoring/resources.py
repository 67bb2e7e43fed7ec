"""Process and device resource readings: psutil for CPU and memory, NVML for GPUs.

Without a GPU (or without the NVIDIA driver) the device reading is an explicit
``{"gpu": None, "reason": ...}``, never an exception.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psutil

logger = logging.getLogger(__name__)

_nvml_lock = threading.Lock()
_nvml_state: dict[str, Any] = {"ready": None, "reason": ""}


def _nvml() -> Any:
    """The initialised pynvml module, or None with the reason recorded."""
    with _nvml_lock:
        if _nvml_state["ready"] is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml_state["ready"] = pynvml
            except Exception as exc:  # no driver, no library, no device
                _nvml_state["ready"] = False
                _nvml_state["reason"] = f"no GPU: {exc}"
        return _nvml_state["ready"] or None


class ProcessSampler:
    def __init__(self, pid: int | None = None) -> None:
        self._proc = psutil.Process(pid)
        self._proc.cpu_percent(None)  # the first reading is always 0; prime it

    def sample(self) -> dict[str, Any]:
        with self._proc.oneshot():
            memory = self._proc.memory_info()
            return {
                "cpu_percent": self._proc.cpu_percent(None),
                "rss_bytes": memory.rss,
                "system_memory_percent": psutil.virtual_memory().percent,
            }


def gpu_reading(index: int) -> dict[str, Any]:
    """Memory and utilisation of GPU ``index`` (as NVML numbers it)."""
    nvml = _nvml()
    if nvml is None:
        return {"gpu": None, "reason": _nvml_state["reason"]}
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        util = nvml.nvmlDeviceGetUtilizationRates(handle)
        return {
            "gpu": index,
            "name": _text(nvml.nvmlDeviceGetName(handle)),
            "memory_used_bytes": int(memory.used),
            "memory_free_bytes": int(memory.free),
            "memory_total_bytes": int(memory.total),
            "utilization_percent": int(util.gpu),
        }
    except Exception as exc:
        return {"gpu": None, "reason": f"NVML reading of GPU {index} failed: {exc}"}


def gpu_count() -> int:
    nvml = _nvml()
    if nvml is None:
        return 0
    try:
        return int(nvml.nvmlDeviceGetCount())
    except Exception:
        logger.warning("NVML could not count GPUs", exc_info=True)
        return 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def host_capacity() -> dict[str, Any]:
    """What a host offers: CPUs, RAM (total and available) and each GPU's memory."""
    memory = psutil.virtual_memory()
    gpus = []
    for index in range(gpu_count()):
        reading = gpu_reading(index)
        if reading.get("gpu") is not None:
            gpus.append(
                {
                    "index": index,
                    "name": reading["name"],
                    "memory_total_bytes": reading["memory_total_bytes"],
                    "memory_free_bytes": reading["memory_free_bytes"],
                }
            )
    return {
        "cpus": psutil.cpu_count() or 1,
        "ram_total_bytes": int(memory.total),
        "ram_available_bytes": int(memory.available),
        "gpus": gpus,
    }
