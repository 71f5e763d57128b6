"""Mutation check: break the mathematics on purpose and require the test suite to notice.

    python tests/mutation_check.py            # every mutation (about a minute on 2 cores)
    python tests/mutation_check.py --list

Each mutation replaces one exact fragment of the M-step, the guidance, the update or the unit
conversion by a wrong one (a sign flipped, a term or a factor dropped, a plain clamp for the
straight-through one, a setting ignored), then runs the test files that cover that code and must
see them fail. The source tree is never touched: the package and the tests are copied into a
temporary directory (with the compiled extension, and ``../shared`` linked beside it as the tests
expect) and mutated there. The selected files are first run unmutated and must pass.

Exit status 1 when a mutation survives, when the unmutated tests fail, or when a fragment is not
found exactly once (the list must follow the code).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("fastem_ext", "tests", "conftest.py", "pytest.ini")


@dataclass(frozen=True)
class Mutation:
    """Replace ``old`` (found exactly once in ``path``) by ``new``; ``tests`` must fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MSTEP, STEP, GUIDANCE = "fastem_ext/mstep.py", "fastem_ext/step.py", "fastem_ext/guidance.py"
MUTATIONS = [
    Mutation("M-step: the ΠGDM ridge without the channel count", MSTEP,
             "particles * channels * shape[0] * shape[1] * ridge_r2",
             "particles * shape[0] * shape[1] * ridge_r2", ("test_mstep.py",)),
    Mutation("M-step: the ℓ2 term dropped", MSTEP,
             "shift = shift + particles * sigma**2 * config.weight", "shift = shift",
             ("test_mstep.py",)),
    Mutation("M-step: the warm start's sign flipped (Eq. 24)", "fastem_ext/ops/wiener_z.py",
             "return (cross + coupling * otf) / denominator",
             "return (cross - coupling * otf) / denominator",
             ("test_ops_wiener_z.py", "test_mstep.py")),
    Mutation("M-step: the ridge setting ignored", STEP,
             "ridge = (tables.x0_var * mstep.ridge).contiguous()",
             "ridge = tables.x0_var.contiguous()", ("test_step.py",)),
    Mutation("M-step: the gradient setting ignored", STEP,
             "if mstep.gradient:", "if False:", ("test_step.py",)),
    Mutation("M-step: the coupling floor ignored", MSTEP,
             "coupling = particles * sigma_c**2 * config.beta",
             "coupling = particles * sigma**2 * config.beta", ("test_mstep.py",)),
    Mutation("guidance: the ΠGDM vector's sign flipped", GUIDANCE,
             "return torch.fft.irfft2(filtered, s=obs.y.shape[-2:])",
             "return -torch.fft.irfft2(filtered, s=obs.y.shape[-2:])",
             ("test_guidance.py", "test_step.py")),
    Mutation("guidance: σ² dropped from the ΠGDM filter", "fastem_ext/ops/pigdm_filter.py",
             "(at(r2, step) * gain + sigma**2)", "(at(r2, step) * gain)",
             ("test_ops_pigdm_filter.py", "test_guidance.py")),
    Mutation("guidance: one DPS norm shared by the particles", GUIDANCE,
             "norms = (weighted * misfit).flatten(1).sum(dim=1).sqrt()",
             "norms = (weighted * misfit).sum().sqrt().expand(misfit.shape[0])",
             ("test_guidance.py", "test_step.py")),
    Mutation("guidance: the outside of the frame unobserved (weight 0)",
             "fastem_ext/observation.py",
             "return self.mask * (1.0 - OUTSIDE_WEIGHT) + OUTSIDE_WEIGHT", "return self.mask",
             ("test_boundary.py", "test_guidance.py", "test_step.py")),
    Mutation("centring: the images moved the kernel's way", "fastem_ext/centring.py",
             "shift(image, offset)[..., pad:", "shift(image, -offset)[..., pad:",
             ("test_centring.py",)),
    Mutation("groups: every kernel group draws from the first group's stream",
             "fastem_ext/step.py", "torch.randn(rows, generator=g, device=device",
             "torch.randn(rows, generator=generator[0], device=device", ("test_groups.py",)),
    Mutation("groups: every kernel group takes the first group's kernel", "fastem_ext/step.py",
             "k = kernel[g] if grouped else kernel", "k = kernel[0] if grouped else kernel",
             ("test_groups.py",)),
    Mutation("together: every photo of a shared call sees the first photo", "fastem_ext/api.py",
             "tuple(observations[index] for index, _ in groups)",
             "tuple(observations[0] for index, _ in groups)", ("test_together.py",)),
    Mutation("together: a shared call's failure fails its photos", "fastem_ext/api.py",
             "        except IMAGE_ERRORS as err:\n            warnings.warn(",
             "        except ZeroDivisionError as err:\n            warnings.warn(",
             ("test_together.py",)),
    Mutation("restarts: the most total variation kept", "fastem_ext/restarts.py",
             "if kept is None or score < scores[kept]:",
             "if kept is None or score > scores[kept]:", ("test_restarts.py",)),
    Mutation("restarts: a diverged restart aborts the run", "fastem_ext/restarts.py",
             "if count == 1:", "if count >= 1:", ("test_restarts.py",)),
    Mutation("guidance: a plain clamp for the straight-through one", STEP,
             "at(tables.sqrt_one_minus_ac, step)))",
             "at(tables.sqrt_one_minus_ac, step)).clamp(-1.0, 1.0))", ("test_step.py",)),
    Mutation("units: ΠGDM's r² not converted to image units", "fastem_ext/schedule.py",
             '"x0_var": self.pigdm_r2 / NETWORK_SCALE**2', '"x0_var": self.pigdm_r2',
             ("test_step.py",)),
    Mutation("update: the guidance step's sign flipped", "fastem_ext/ops/ddpm_update.py",
             "x_prev = x_prev + (scale * at(coefs[5], step)) * grad",
             "x_prev = x_prev - (scale * at(coefs[5], step)) * grad",
             ("test_ops_ddpm_update.py",)),
    Mutation("update: the noise term dropped", "fastem_ext/ops/ddpm_update.py",
             " + at(coefs[4], step) * noise", "", ("test_ops_ddpm_update.py",)),
    Mutation("network: the group norm's VJP without its x̂ term",
             "fastem_ext/ops/group_norm_silu.py",
             "(g - g.mean(-1, keepdim=True) - xh * (g * xh).mean(-1, keepdim=True))",
             "(g - g.mean(-1, keepdim=True))", ("test_ops_group_norm_silu.py",)),
    Mutation("export: σ frozen at its traced value", "fastem_ext/ops/_backend.py",
             "if like.dtype not in FUSED_DTYPES or isinstance(scalar, torch.Tensor):",
             "if like.dtype not in FUSED_DTYPES:", ("test_aot.py",)),
]


def pytest(root: Path, files: tuple[str, ...]) -> tuple[bool, float, str]:
    """Run ``files`` (under tests/) in the copy at ``root``: (passed, seconds, output's tail)."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    env.pop("FASTEM_BACKEND", None)
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               *(f"tests/{f}" for f in files)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
    return result.returncode == 0, time.perf_counter() - start, tail


def copy_tree(work: Path) -> Path:
    """The package and tests in ``work/repo``, ``work/shared`` linked to the real one."""
    root = work / "repo"
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            root.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    shared = REPO.parent / "shared"
    if shared.is_dir():
        (work / "shared").symlink_to(shared)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}  [{m.path}; {', '.join(m.tests)}]")
        return 0
    failures = []
    with tempfile.TemporaryDirectory(prefix="fastem-mutation-") as tmp:
        root = copy_tree(Path(tmp))
        files = tuple(dict.fromkeys(f for m in MUTATIONS for f in m.tests))
        passed, seconds, tail = pytest(root, files)
        print(f"unmutated: {'pass' if passed else 'FAIL'} ({seconds:.0f} s, {len(files)} files)")
        if not passed:
            print(tail)
            return 1
        for m in MUTATIONS:
            path = root / m.path
            source = path.read_text()
            if source.count(m.old) != 1:
                failures.append(f"{m.name}: fragment found {source.count(m.old)} times")
                print(f"SKIPPED  {m.name}: fragment not found exactly once")
                continue
            path.write_text(source.replace(m.old, m.new))
            try:
                survived, seconds, _ = pytest(root, m.tests)
            finally:
                path.write_text(source)
            print(f"{'SURVIVED' if survived else 'caught  '} {m.name} ({seconds:.0f} s)")
            if survived:
                failures.append(f"{m.name}: the tests still pass")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
