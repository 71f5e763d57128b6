"""The ``fastem`` command: ``fastem deblur IN -o OUT``, ``fastem batch IN... -o OUT_DIR``,
``fastem demo`` and ``fastem export``.

Exit codes: 0 done, 2 bad input or a failed run (one line on stderr, no traceback, no output
written), 3 a batch job that finished with some images failed (each one recorded in the
manifest), 130 interrupted (Ctrl-C; nothing partial written)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch

from .aot import EXPORT_METHODS, WholeImageWarning
from .api import run
from .boundary import BOUNDARIES
from .checks import LEAST_SIGMA, MAX_SIGMA, check_int, check_kernel, check_kernel_size
from .hardware import default_threads
from .io import (
    check_outputs,
    commit_files,
    encode_image,
    encode_kernel,
    image_suffixes,
    kernel_suffixes,
    kernel_tile,
    load_image,
    read_kernel,
)
from .mstep import REGULARIZERS
from .restarts import RestartsDiverged
from .settings import BLIND, DEFAULT_CROPS, DEFAULT_KERNEL_SIZE, METHODS, kernel_size_or_default

SOME_FAILED = 3  # exit status of a batch job that finished with failed images
DESCRIPTION = ("Blind deblurring with a diffusion prior (Fast Diffusion EM): estimate the "
               "camera-shake kernel of a blurry photo and restore it.")


def _common(parser: argparse.ArgumentParser, methods: tuple[str, ...] = METHODS,
            kernel_option: bool = False) -> None:
    """The options every command shares (``kernel_option``: the command has ``--kernel``)."""
    parser.add_argument("--method", choices=methods, default="fastem-pigdm",
                        help="fastem-pigdm (default), fastem-dps, diffem-pigdm (blind)"
                        + (", or the non-blind pigdm / dps, which need --kernel"
                           if "pigdm" in methods else ""))
    parser.add_argument("--prior", default="natural",
                        help="natural (bundled), gaussian, ffhq, imagenet, a guided-diffusion "
                        ".pt file or natural-prior .safetensors weights")
    parser.add_argument("--particles", type=int, default=1, help="posterior samples (default 1)")
    parser.add_argument("--steps", default=None, help="diffusion steps, e.g. 100 or ddim50")
    parser.add_argument("--kernel-size", type=int, default=None,
                        help=f"size K of the K×K kernel to estimate, in pixels (default "
                        f"{DEFAULT_KERNEL_SIZE}" + ("; with --kernel, its size)"
                                                    if kernel_option else ")"))
    parser.add_argument("--regularizer", choices=REGULARIZERS, default="pnp",
                        help="the kernel prior of the M-step (default pnp: the bundled "
                        "kernel denoiser)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed: the same seed gives the same result (default 0)")
    parser.add_argument("--restarts", type=int, default=None,
                        help="blind runs per image, restart r of R with the random stream "
                        "of seed SEED·R + r; the one whose result has the least total "
                        "variation is kept (default 3 for fastem-pigdm, 1 for the other blind "
                        "methods; non-blind methods run once)")
    parser.add_argument("--batch-restarts", action="store_true",
                        help="run fastem-pigdm's or fastem-dps's restarts as one batch (one "
                        "network call per step for all): faster where the device has room to "
                        "spare, as a GPU may; slower on a small CPU")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else "
                        "one per idle core)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _large_photos(parser: argparse.ArgumentParser) -> None:
    """The options of issue 16's crops + tiles path, shared by ``deblur`` and ``batch``."""
    large = parser.add_argument_group(
        "large photos", "above --working-size on a side and with more pixels than the crops "
        "cover (3 × 224² by default): the kernel from crops, the frame in tiles (or by --fast "
        "deconvolution)")
    large.add_argument("--working-size", type=int, default=256,
                       help="side of one crop or tile's grid, in pixels (default 256)")
    large.add_argument("--crops", type=int, default=DEFAULT_CROPS,
                       help=f"crops the kernel is estimated on (default {DEFAULT_CROPS})")
    large.add_argument("--max-batch", type=int, default=None,
                       help="network inputs per call (crops × particles, tiles × particles): "
                       "bounds the memory (default 8, or crops × particles if more)")
    large.add_argument("--tile-steps", default=None,
                       help="diffusion steps of the non-blind tile pass (default 25 for "
                       "ΠGDM, 1000 for DPS)")
    large.add_argument("--fast", action="store_true",
                       help="restore the frame by TV deconvolution with the estimated kernel "
                       "instead of the tiles (a preview: the deconvolution takes seconds, after "
                       "the crops' blind runs)")
    large.add_argument("--full-diffusion", action="store_true",
                       help="one diffusion run over the whole photo, whatever its size")


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as every other error of the command: one line, ``fastem:
    error: …`` (printed by ``main``), exit status 2. Its sub-commands' parsers are of this
    class too (``add_subparsers`` makes them so)."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastem", description=DESCRIPTION,
                     epilog="Exit codes: 0 done, 2 bad input or failed run, "
                     f"{SOME_FAILED} batch finished with failed images, 130 "
                     "interrupted; nothing partial is ever written.")
    commands = parser.add_subparsers(dest="command", required=True)
    deblur = commands.add_parser("deblur", help="estimate the blur kernel and restore a photo")
    deblur.add_argument("input", help="blurry image (PNG 8/16-bit, JPEG, TIFF, ...)")
    deblur.add_argument("-o", "--output", required=True, help="restored image")
    deblur.add_argument("--sigma", type=float, default=None,
                        help="noise std in /255 units (default: estimated)")
    deblur.add_argument("--kernel", default=None,
                        help="the known kernel (.npy, or an image scaled to any peak) for "
                        "--method pigdm or dps; with a blind method, the initial estimate")
    deblur.add_argument("--kernel-out", default=None,
                        help="estimated kernel: .npy (exact values) or a 16-bit PNG scaled to "
                        "its peak, at the kernel's own size (see --kernel-preview)")
    deblur.add_argument("--kernel-preview", default=None,
                        help="the estimated kernel as a viewable image: 256×256, white at its "
                        "peak, pixels enlarged")
    deblur.add_argument("--mean-out", default=None, help="average of the particles (image)")
    deblur.add_argument("--report", default=None, help="JSON report of settings and timings")
    deblur.add_argument("--boundary", choices=BOUNDARIES, default="valid",
                        help="valid (default: real photos, no wrap-around) or circular "
                        "(synthetic data blurred circularly)")
    _large_photos(deblur)
    _common(deblur, kernel_option=True)
    batch = commands.add_parser(
        "batch", help="deblur many photos into a folder: resumable, runs under torchrun",
        description="Deblur every image of the inputs into OUT_DIR (x.jpg -> x.png and "
        "x.kernel.npy), one manifest line per image (OUT_DIR/manifest.jsonl). A rerun skips "
        "what is done with the same settings; a failed image is recorded and the job goes on "
        f"(exit {SOME_FAILED}). Under torchrun each process takes a share of the inputs.")
    batch.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) "
                       "or glob patterns (quote them)")
    batch.add_argument("-o", "--output-dir", required=True,
                       help="folder of the results and the manifest (created if missing)")
    batch.add_argument("--sigma", type=float, default=None,
                       help="noise std in /255 units, the same for every image (default: "
                       "estimated per image)")
    batch.add_argument("--boundary", choices=BOUNDARIES, default="valid",
                       help="valid (default) or circular")
    batch.add_argument("--batch-images", type=int, default=1, metavar="N",
                       help="up to N images of one size on the whole-image path share each "
                       "network call (fastem-pigdm, fastem-dps; default 1: one at a time, "
                       "faster on a small CPU; see benchmarks/RESULTS.md)")
    _large_photos(batch)
    _common(batch, BLIND)
    demo = commands.add_parser("demo", help="blur a sample, restore it, write a comparison PNG")
    demo.add_argument("image", nargs="?", default=None,
                      help="a sharp image to use instead of the built-in sample")
    demo.add_argument("-o", "--output", default="fastem_demo.png", help="the panel (PNG)")
    demo.add_argument("--noise", type=float, default=5.0, help="added noise std, /255 units")
    demo.add_argument("--size", type=int, default=256, help="centre crop of the sample")
    demo.add_argument("--kernel-seed", type=int, default=7,
                      help="seed of the generated camera-shake kernel")
    _common(demo)
    export = commands.add_parser(
        "export", help="compile a package for deblurring from C++ (csrc/api/fastem.h)",
        description="Compile the deblur's programs ahead of time (AOTInductor) for one photo "
        "size and the settings below into a package folder: observe.pt2, step.pt2, finish.pt2 "
        "and manifest.json. Minutes for the natural prior on a CPU.")
    export.add_argument("output", help="the package folder to create (must not exist)")
    export.add_argument("--size", required=True, metavar="HxW",
                        help="the photos' size in pixels, e.g. 256x256")
    export.add_argument("--method", choices=EXPORT_METHODS, default="fastem-pigdm",
                        help="fastem-pigdm (default) or fastem-dps")
    export.add_argument("--prior", default="natural",
                        help="natural (bundled), gaussian, ffhq, imagenet, a guided-diffusion "
                        ".pt file or natural-prior .safetensors weights")
    export.add_argument("--particles", type=int, default=1, help="posterior samples (default 1)")
    export.add_argument("--steps", default=None, help="diffusion steps, e.g. 100 or ddim50")
    export.add_argument("--kernel-size", type=int, default=DEFAULT_KERNEL_SIZE,
                        help="size K of the K×K kernel to estimate, in pixels (default "
                        f"{DEFAULT_KERNEL_SIZE})")
    export.add_argument("--regularizer", choices=REGULARIZERS, default="pnp",
                        help="the kernel prior of the M-step (default pnp)")
    export.add_argument("--boundary", choices=BOUNDARIES, default="valid",
                        help="valid (default: real photos) or circular")
    export.add_argument("--restarts", type=int, default=None,
                        help="blind runs per photo, the least total variation kept (default "
                        "3 for fastem-pigdm, 1 for the other blind methods)")
    export.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    export.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the compilation (default: as deblur)")
    return parser


def _size(text: str) -> tuple[int, int]:
    """``"HxW"`` → ``(H, W)``."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"--size must be HxW in pixels (e.g. 256x256), got {text!r}")
    return int(parts[0]), int(parts[1])


@contextlib.contextmanager
def _one_line_warnings(*categories: type[Warning]) -> Iterator[None]:
    """The project's own warnings (``categories``) as one line each, ``fastem: warning: …``,
    as the command's errors, every time (a batch job warns per image), written above an open
    progress bar (``tqdm.write``); others as Python shows them."""
    with warnings.catch_warnings():
        for category in categories:
            warnings.simplefilter("always", category)
        shown = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if issubclass(category, categories):  # above a progress bar, not through it
                from tqdm import tqdm

                tqdm.write(f"fastem: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        threads = default_threads() if args.threads is None else args.threads
        if threads is not None:
            torch.set_num_threads(check_int("--threads", threads, low=1, high=1024))
        with _one_line_warnings(WholeImageWarning, RestartsDiverged):
            if args.command == "deblur":
                _deblur(args)
            elif args.command == "batch":
                return _batch(args)
            elif args.command == "export":
                _export(args)
            else:
                from .demo import run_demo

                print(run_demo(args))
    except (ValueError, RuntimeError, OSError) as err:
        print(f"fastem: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args is not None and args.command == "batch":
            print("fastem: interrupted: the finished images are kept (see the manifest); run "
                  "the same command again to go on", file=sys.stderr)
        else:
            print("fastem: interrupted: no output was written", file=sys.stderr)
        return 130
    return 0


def _deblur(args: argparse.Namespace) -> None:
    sigma = _sigma(args.sigma)
    loaded = load_image(args.input, name="input")
    if args.kernel is None:
        kernel = None
        size = check_kernel_size("--kernel-size", kernel_size_or_default(args.kernel_size),
                                 loaded.image.shape[-2:])
    else:
        kernel = check_kernel("--kernel", read_kernel(args.kernel, "--kernel"), blur=True)
        size = len(kernel)  # run() refuses a --kernel-size that disagrees
    image = (tuple(loaded.image.shape), loaded.bits)  # what each output will hold
    outputs = check_outputs(
        {"-o/--output": args.output, "--mean-out": args.mean_out,
         "--kernel-out": args.kernel_out, "--kernel-preview": args.kernel_preview,
         "--report": args.report},
        {"-o/--output": image_suffixes(), "--mean-out": image_suffixes(),
         "--kernel-out": kernel_suffixes(), "--kernel-preview": image_suffixes(),
         "--report": (".json",)},
        (args.input, args.kernel),
        {"-o/--output": image, "--mean-out": image, "--kernel-out": ((1, size, size), 16),
         "--kernel-preview": ((3, 256, 256), 8)})
    result = run(loaded.image, sigma, method=args.method, prior=args.prior,
                 particles=args.particles, steps=args.steps, kernel_size=args.kernel_size,
                 seed=args.seed, restarts=args.restarts,
                 batch_restarts=args.batch_restarts, device=args.device,
                 progress=not args.quiet, boundary=args.boundary,
                 regularizer=args.regularizer, kernel=kernel,
                 working_size=args.working_size, crops=args.crops, max_batch=args.max_batch,
                 tile_steps=args.tile_steps, fast=args.fast, full_diffusion=args.full_diffusion)
    files = {outputs["-o/--output"]: encode_image(args.output, result.image, loaded.bits,
                                                  loaded.icc)}
    if "--mean-out" in outputs:
        files[outputs["--mean-out"]] = encode_image(args.mean_out, result.mean, loaded.bits,
                                                    loaded.icc)
    if "--kernel-out" in outputs:
        files[outputs["--kernel-out"]] = encode_kernel(args.kernel_out, result.kernel)
    if "--kernel-preview" in outputs:
        files[outputs["--kernel-preview"]] = encode_image(args.kernel_preview,
                                                          kernel_tile(result.kernel, 256))
    if "--report" in outputs:
        info = {**result.info, "input": str(args.input), "output": str(args.output)}
        files[outputs["--report"]] = (json.dumps(info, indent=2) + "\n").encode()
    commit_files(files)
    info = result.info
    restarts = info["restarts"]
    kept = (f", restart {restarts['kept'] + 1} of {restarts['count']} kept"
            if restarts and restarts["count"] > 1 else "")
    print(f"{args.output}: sigma {255 * info['sigma']:.2f}/255"
          f"{' (estimated)' if info['sigma_estimated'] else ''}, reblur RMSE "
          f"{255 * info['reblur_rmse']:.2f}/255, {info['path']}{kept}, "
          f"{info['seconds_total']:.1f} s on {info['device']}")


def _sigma(sigma: float | None) -> float | None:
    """``--sigma`` (/255 units) in [0, 1] units, checked in the units typed."""
    if sigma is not None and not LEAST_SIGMA * 255 <= sigma <= MAX_SIGMA * 255:
        raise ValueError(f"--sigma must be in [{LEAST_SIGMA * 255:g}, {MAX_SIGMA * 255:g}] "
                         f"(/255 units), got {sigma:g}")
    return None if sigma is None else sigma / 255


def _batch(args: argparse.Namespace) -> int:
    """Run the job; rank 0 (the only process without torchrun) prints the summary."""
    from .batch import run_batch
    from .distributed import ranks_from_env

    result = run_batch(args.inputs, args.output_dir, _sigma(args.sigma), method=args.method,
                       prior=args.prior, particles=args.particles, steps=args.steps,
                       kernel_size=kernel_size_or_default(args.kernel_size), seed=args.seed,
                       restarts=args.restarts, batch_restarts=args.batch_restarts,
                       device=args.device, boundary=args.boundary,
                       regularizer=args.regularizer,
                       working_size=args.working_size, crops=args.crops,
                       max_batch=args.max_batch, tile_steps=args.tile_steps, fast=args.fast,
                       full_diffusion=args.full_diffusion, batch_images=args.batch_images,
                       progress=not args.quiet)
    if ranks_from_env().rank != 0:
        return 0
    total, failed = len(result.records), result.failed
    same = f", {len(result.duplicates)} duplicate input(s) skipped" if result.duplicates else ""
    print(f"{args.output_dir}: {total - len(failed)} of {total} images done ({result.processed} "
          f"run now, {result.skipped} done before{same})")
    if failed:
        for record in failed[:10]:
            print(f"  failed: {record['input']}: {record['error']}", file=sys.stderr)
        more = f" (and {len(failed) - 10} more)" if len(failed) > 10 else ""
        print(f"fastem: {len(failed)} of {total} failed{more}: see "
              f"{Path(args.output_dir) / 'manifest.jsonl'}", file=sys.stderr)
        return SOME_FAILED
    return 0


def _export(args: argparse.Namespace) -> None:
    from .aot import export

    height, width = _size(args.size)
    manifest = export(args.output, height, width, prior=args.prior, method=args.method,
                      particles=args.particles, steps=args.steps,
                      kernel_size=args.kernel_size, boundary=args.boundary,
                      regularizer=args.regularizer, restarts=args.restarts,
                      device=args.device)
    megabytes = sum(f.stat().st_size for f in Path(args.output).iterdir()) / 1e6
    print(f"{args.output}: {manifest['method']}, prior {manifest['prior']}, {height}x{width}, "
          f"{manifest['restarts']} × {manifest['steps']} steps, {manifest['device']}: "
          f"{megabytes:.1f} MB, exported in {manifest['export_seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
