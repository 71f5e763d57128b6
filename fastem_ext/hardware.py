"""One line naming a device for reports, logs and model cards (no engine imported)."""

from __future__ import annotations

import os

import torch


def describe_device(device: torch.device | str) -> str:
    """One line naming the device for reports: the GPU, or the CPU model, its cores and torch's
    threads; with the torch version."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"cpu: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), "
            f"torch {torch.__version__}")
