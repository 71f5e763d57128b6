"""The machine: one line naming a device for reports, logs and model cards, and the CPU thread
count a run should use (no engine imported)."""

from __future__ import annotations

import os
import time

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


def default_threads() -> int | None:
    """Torch CPU threads for a command-line run: ``None`` (leave torch's count) where
    ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` says what the user or a scheduler wants, else one
    per core of this process's affinity set that is idle now, at least one.

    "Idle now" is sampled from ``/proc/stat`` over 0.2 s (a load average would still count a
    job that ended a minute ago). Measured on a 2-core AMD EPYC (python
    benchmarks/bench_engine.py, 256², 100 steps): idle, 1 thread 33.9 s and 2 threads 19.4 s
    per image; beside one busy process, 1 thread 33.9 s and 2 threads 71.9 s — oversubscribed
    threads wait on each other, so a busy core is best left alone.
    """
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return None
    try:
        cores = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    busy = busy_cores(cores)
    return max(1, len(cores) - round(busy))


def busy_cores(cores: list[int], interval: float = 0.2) -> float:
    """How many of ``cores`` other processes keep busy, from two reads of ``/proc/stat``
    ``interval`` seconds apart (0 where it cannot be read)."""

    def sample() -> tuple[int, int]:
        total = idle = 0
        with open("/proc/stat") as handle:
            for line in handle:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                    values = [int(v) for v in fields[:8]]
                    total, idle = total + sum(values), idle + values[3] + values[4]
        return total, idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    elapsed = total1 - total0
    return len(cores) * (1 - (idle1 - idle0) / elapsed) if elapsed > 0 else 0.0
