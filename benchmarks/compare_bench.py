"""Regression gate of the CPU benchmark suite against a committed baseline.

    python benchmarks/compare_bench.py BASELINE.json RUN.json [--threshold 2.5]
    python benchmarks/compare_bench.py --write-baseline RUN.json BASELINE.json

Two checks. **Paired** (always): each fused implementation (``…-cpp]``, ``…-fast]``) is timed in
the same run as its pure-torch reference (``…-reference]``); it regresses when its time relative
to the reference grows by more than ``threshold``× over the baseline's ratio. Both sides of a
pair meet the same load, so this holds on a busy machine. **Absolute** (only on a comparable
machine): each median divided by the ``calibration`` benchmark's of the same run, against the
baseline's; skipped, with a message, when the calibration itself is more than ``threshold``×
away from the baseline's (a loaded or different machine, where that normalisation means
nothing). Exit status 1 on a regression or when a baseline benchmark is missing from the run.
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


def pairs(names: set[str]) -> dict[str, str]:
    """``{fused benchmark: its reference}`` for every pair present in ``names``."""
    out = {}
    for name in names:
        for suffix in ("-cpp]", "-fast]"):
            if name.endswith(suffix):
                reference = name[: -len(suffix)] + "-reference]"
                if reference in names:
                    out[name] = reference
    return out


def compare(baseline: dict[str, float], run: dict[str, float],
            threshold: float) -> tuple[list[str], list[str]]:
    """(report lines, failures)."""
    lines, failures = [], []
    missing = sorted(set(baseline) - set(run))
    failures += [f"{name}: in the baseline but not in this run" for name in missing]
    for fused, reference in sorted(pairs(set(baseline) & set(run)).items()):
        before = baseline[fused] / baseline[reference]
        now = run[fused] / run[reference]
        flag = "REGRESSION" if now > threshold * before else ""
        lines.append(f"{fused:60} {before:6.2f} -> {now:6.2f} of its reference {flag}")
        if flag:
            failures.append(f"{fused}: {now:.2f}x its reference's time, was {before:.2f}x")
    if CALIBRATION not in baseline or CALIBRATION not in run:
        return lines, failures + [f"both files need the {CALIBRATION} benchmark"]
    load = run[CALIBRATION] / baseline[CALIBRATION]
    if not 1 / threshold <= load <= threshold:
        lines.append(f"absolute check skipped: the calibration took {load:.2f}x the baseline's "
                     "time (a loaded or different machine)")
        return lines, failures
    for name, base in sorted(baseline.items()):
        if name == CALIBRATION or name not in run:
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
