"""Regression gate of the CPU benchmark suite against a committed baseline.

    python benchmarks/compare_bench.py BASELINE.json RUN.json [--threshold 2.5]
    python benchmarks/compare_bench.py --write-baseline RUN.json BASELINE.json

Each benchmark's median is divided by the median of the ``calibration`` benchmark of the same
run; a benchmark regresses when that ratio grows by more than ``threshold``× over the baseline's
(loose: CPU timings on shared machines are noisy). Exit status 1 on a regression or when a
baseline benchmark is missing from the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CALIBRATION = "test_calibration"


def medians(path: Path) -> dict[str, float]:
    """``{name: median seconds}`` from a pytest-benchmark JSON or a baseline written here."""
    data = json.loads(path.read_text())
    if "medians" in data:
        return data["medians"]
    return {b["name"]: b["stats"]["median"] for b in data["benchmarks"]}


def compare(baseline: dict[str, float], run: dict[str, float],
            threshold: float) -> tuple[list[str], list[str]]:
    """(report lines, failures)."""
    if CALIBRATION not in baseline or CALIBRATION not in run:
        return [], [f"both files need the {CALIBRATION} benchmark"]
    lines, failures = [], []
    for name, base in sorted(baseline.items()):
        if name == CALIBRATION:
            continue
        if name not in run:
            failures.append(f"{name}: in the baseline but not in this run")
            continue
        ratio = (run[name] / run[CALIBRATION]) / (base / baseline[CALIBRATION])
        flag = "REGRESSION" if ratio > threshold else ""
        lines.append(f"{name:60} {base * 1e3:9.3f} ms -> {run[name] * 1e3:9.3f} ms "
                     f"(normalised x{ratio:.2f}) {flag}")
        if flag:
            failures.append(f"{name}: {ratio:.2f}x slower relative to the calibration")
    lines += [f"{name:60} new (no baseline)" for name in sorted(set(run) - set(baseline))]
    return lines, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--threshold", type=float, default=2.5)
    parser.add_argument("--write-baseline", action="store_true",
                        help="write FIRST (a pytest-benchmark JSON) as the baseline SECOND")
    args = parser.parse_args(argv)
    if args.write_baseline:
        data = json.loads(args.first.read_text())
        baseline = {"machine": data.get("machine_info", {}).get("cpu", {}).get("brand_raw"),
                    "datetime": data.get("datetime"), "medians": medians(args.first)}
        args.second.write_text(json.dumps(baseline, indent=1, sort_keys=True) + "\n")
        return 0
    lines, failures = compare(medians(args.first), medians(args.second), args.threshold)
    print("\n".join(lines))
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
