"""The ``fastem`` command: ``fastem deblur IN -o OUT`` and ``fastem demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .api import METHODS, run
from .boundary import BOUNDARIES
from .io import atomic_write, load_image, write_image, write_kernel
from .mstep import REGULARIZERS


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=METHODS, default="fastem-pigdm")
    parser.add_argument("--prior", default="natural",
                        help="natural (bundled), gaussian, ffhq, imagenet or a .pt path")
    parser.add_argument("--particles", type=int, default=1, help="posterior samples (default 1)")
    parser.add_argument("--steps", default=None, help="diffusion steps, e.g. 100 or ddim50")
    parser.add_argument("--kernel-size", type=int, default=33)
    parser.add_argument("--regularizer", choices=REGULARIZERS, default="pnp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastem", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    deblur = commands.add_parser("deblur", help="estimate the blur kernel and restore a photo")
    deblur.add_argument("input", help="blurry image (PNG 8/16-bit, JPEG, TIFF, ...)")
    deblur.add_argument("-o", "--output", required=True, help="restored image")
    deblur.add_argument("--sigma", type=float, default=None,
                        help="noise std in /255 units (default: estimated)")
    deblur.add_argument("--kernel-out", default=None, help="estimated kernel (.png or .npy)")
    deblur.add_argument("--mean-out", default=None, help="average of the particles (PNG)")
    deblur.add_argument("--report", default=None, help="JSON report of settings and timings")
    deblur.add_argument("--boundary", choices=BOUNDARIES, default="valid")
    _common(deblur)
    demo = commands.add_parser("demo", help="blur a sample, restore it, write a comparison PNG")
    demo.add_argument("image", nargs="?", default=None,
                      help="a sharp image to use instead of the built-in sample")
    demo.add_argument("-o", "--output", default="fastem_demo.png")
    demo.add_argument("--noise", type=float, default=5.0, help="added noise std, /255 units")
    demo.add_argument("--size", type=int, default=256, help="centre crop of the sample")
    demo.add_argument("--kernel-seed", type=int, default=7)
    _common(demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "deblur":
            _deblur(args)
        else:
            from .demo import run_demo

            print(run_demo(args))
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"fastem: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastem: interrupted (no output written)", file=sys.stderr)
        return 130
    return 0


def _deblur(args: argparse.Namespace) -> None:
    for option in ("output", "kernel_out", "mean_out", "report"):
        target = getattr(args, option)
        if target is not None and not Path(target).parent.resolve().is_dir():
            raise ValueError(f"--{option.replace('_', '-')}: folder does not exist: {target}")
    loaded = load_image(args.input, name="input")
    sigma = None if args.sigma is None else args.sigma / 255
    result = run(loaded.image, sigma, method=args.method, prior=args.prior,
                 particles=args.particles, steps=args.steps, kernel_size=args.kernel_size,
                 seed=args.seed, device=args.device, progress=not args.quiet,
                 boundary=args.boundary, regularizer=args.regularizer)
    write_image(args.output, result.image, bits=loaded.bits)
    if args.mean_out:
        write_image(args.mean_out, result.mean, bits=loaded.bits)
    if args.kernel_out:
        write_kernel(args.kernel_out, result.kernel)
    if args.report:
        info = {**result.info, "input": str(args.input), "output": str(args.output)}
        atomic_write(Path(args.report), (json.dumps(info, indent=2) + "\n").encode())
    info = result.info
    print(f"{args.output}: sigma {255 * info['sigma']:.2f}/255"
          f"{' (estimated)' if info['sigma_estimated'] else ''}, reblur RMSE "
          f"{255 * info['reblur_rmse']:.2f}/255, {info['seconds_total']:.1f} s on {info['device']}")


if __name__ == "__main__":
    sys.exit(main())
