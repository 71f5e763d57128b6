"""C++ against Python: ``fastem_deblur`` with a package (``fastem export``) and ``run()`` with the
package's settings, on the same photo, σ and seed, interleaved, on the CPU.

    python benchmarks/bench_aot.py PACKAGE BUILD/fastem_deblur --repeats 2 --json out.json

Reports per run the wall time of the whole call (C++: the process, package load included;
Python: ``run()`` in this process, its prior already loaded once) and of the sampling loop
alone, the largest difference between the two outputs, the load average and the threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastem_ext import blur, motion_kernel, run
from fastem_ext.io import encode_image


def photo(height: int, width: int, path: Path) -> None:
    """A smooth random scene blurred by a camera-shake kernel, σ = 5/255, as a 16-bit PNG."""
    generator = torch.Generator().manual_seed(5)
    scene = torch.rand(1, 3, height + 4, width + 4, generator=generator)
    blurry = blur(torch.nn.functional.avg_pool2d(scene, 5, 1)[0], motion_kernel(15, seed=2))
    blurry = (blurry + 5 / 255 * torch.randn(blurry.shape, generator=generator)).clamp(0, 1)
    path.write_bytes(encode_image(path, blurry, 16))


def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package")
    parser.add_argument("binary")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manifest = json.loads((Path(args.package) / "manifest.json").read_text())
    folder = Path(tempfile.mkdtemp())
    source, output = folder / "in.png", folder / "out.npy"
    photo(manifest["height"], manifest["width"], source)
    settings = dict(method=manifest["method"], prior=manifest["prior"],
                    particles=manifest["particles"], steps=manifest["steps_spec"],
                    kernel_size=manifest["kernel_size"], boundary=manifest["boundary"],
                    regularizer=manifest["regularizer"], r2=manifest["r2"],
                    guidance_scale=manifest["guidance_scale"], restarts=manifest["restarts"],
                    seed=0, progress=False)
    run(source, 5 / 255, **{**settings, "steps": "2"})  # loads the prior and the denoiser once
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for repeat in range(args.repeats):
        load = os.getloadavg()[0]
        started = time.perf_counter()
        done = subprocess.run([args.binary, args.package, str(source), str(output), "--sigma",
                               "5", "--quiet"], capture_output=True, text=True, env=env,
                              check=True)
        cpp_wall = time.perf_counter() - started
        cpp_loop = float(re.search(r"kept\) in ([0-9.]+) s$", done.stdout, re.M).group(1))
        started = time.perf_counter()
        result = run(source, 5 / 255, **settings)
        python_wall = time.perf_counter() - started
        difference = float((torch.from_numpy(np.load(output)) - result.image).abs().max())
        rows.append({"repeat": repeat, "load_average_1min": load, "cpp_wall_s": cpp_wall,
                     "cpp_loop_s": cpp_loop, "python_wall_s": python_wall,
                     "python_loop_s": result.info["seconds_sampling"],
                     "max_abs_difference": difference})
        print(json.dumps(rows[-1]))
    report = {
        "package": {k: manifest[k] for k in ("prior", "method", "height", "width", "steps",
                                             "particles", "kernel_size", "torch_version")},
        "cpu": cpu_name(), "threads": args.threads,
        "command": " ".join(["python", "benchmarks/bench_aot.py", args.package, args.binary,
                             "--repeats", str(args.repeats), "--threads", str(args.threads)]),
        "runs": rows,
        "median_wall_ratio_cpp_over_python": statistics.median(
            r["cpp_wall_s"] / r["python_wall_s"] for r in rows),
        "median_loop_ratio_cpp_over_python": statistics.median(
            r["cpp_loop_s"] / r["python_loop_s"] for r in rows),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
