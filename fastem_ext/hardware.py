"""The machine: one line naming a device for reports, logs and model cards, and the CPU thread
count a run should use (no engine imported)."""

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


def default_threads() -> int:
    """Torch CPU threads for a command-line run: one per core that is not already busy (the
    one-minute load average, rounded), at least one.

    Measured on a 2-core AMD EPYC (python benchmarks/bench_engine.py, 256², 100 steps): idle,
    1 thread 33.9 s and 2 threads 19.4 s per image; beside one busy process, 1 thread 33.9 s and
    2 threads 71.9 s — oversubscribed threads wait on each other, so a busy core is best left
    alone.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(cores, cores - round(load)))

