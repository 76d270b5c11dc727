"""One line naming the machine a benchmark ran on, for the tables kept in the BENCHMARKS.md files."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(device: str = "cpu") -> str:
    """E.g. "AMD EPYC, 2 cores visible, Python 3.11.7, torch 2.13.0+cpu, 1 threads" or, for a CUDA
    device, its name first."""
    parts = [cpu_model(), f"{os.cpu_count()} cores visible", f"Python {platform.python_version()}"]
    try:
        import torch
    except ImportError:  # the data benchmark needs no torch
        return ", ".join(parts)
    parts += [f"torch {torch.__version__}", f"{torch.get_num_threads()} threads"]
    if str(device).startswith("cuda"):
        parts.insert(0, torch.cuda.get_device_name(torch.device(device)))
    return ", ".join(parts)
