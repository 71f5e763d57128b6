"""Pack the prior's training data compactly, for a machine that does not see ``../shared/data``
(a lent GPU takes the repository and at most 64 MiB in all).

    python python/pack_training_data.py              # writes .pack/data (git-ignored)
    FASTEM_DATA=.pack/data python python/train_prior.py --config gpu ...

``natural/train``: the JPEG files as they are, every other image re-encoded as JPEG quality 95
without chroma subsampling (the same stem, so the validation-leak guard still sees names).
``natural/val``: the 288×288 centre crops of the first ``--val-count`` (all 24) validation images,
as PNG (lossless). They hold training's 256×256 validation crops exactly (the same centre: both
margins are even) and the 256 + K − 1 windows of ``evaluate.py``'s valid-boundary test set at
K = 33 (``python/eval_gpu.sh``), so the figures do not change.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prior_common import DATA, REPO, load_uint8, train_files, val_files  # noqa: E402

from fastem_ext.io import center_crop  # noqa: E402


def pack(out: Path, val_count: int, val_crop: int, data_dir: Path = DATA) -> int:
    """Write the pack to ``out`` (replacing it); returns its size in bytes."""
    if out.resolve() == data_dir.resolve():
        raise SystemExit("the pack must not replace the data it is made from")
    shutil.rmtree(out, ignore_errors=True)
    train, val = out / "natural" / "train", out / "natural" / "val"
    train.mkdir(parents=True)
    val.mkdir(parents=True)
    for path in train_files(data_dir):
        if path.suffix.lower() in (".jpg", ".jpeg"):
            shutil.copyfile(path, train / path.name)
        else:
            image = Image.fromarray(load_uint8(path).permute(1, 2, 0).numpy())
            image.save(train / (path.stem + ".jpg"), quality=95, subsampling=0)
    for path in val_files(data_dir)[:val_count]:
        crop = center_crop(load_uint8(path), val_crop)
        Image.fromarray(crop.permute(1, 2, 0).numpy()).save(val / (path.stem + ".png"))
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / ".pack" / "data")
    p.add_argument("--val-count", type=int, default=24)
    p.add_argument("--val-crop", type=int, default=288)
    args = p.parse_args(argv)
    size = pack(args.out, args.val_count, args.val_crop)
    print(f"wrote {args.out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
