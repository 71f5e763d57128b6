"""Mid-size photos (256x384): the default crops + tiles path vs the whole-image run. Kodak, EVAL kernels, σ10."""
import csv, sys, time
sys.path.insert(0, "/work/main/python")
import torch
torch.set_num_threads(2)
from prior_common import val_files
from fastem_ext.api import run
from fastem_ext.io import read_image, center_crop
from fastem_ext.metrics import kernel_mse, psnr
from fastem_ext.motion import EVAL_SEEDS, motion_kernel
from fastem_ext.physics import blur

out = sys.argv[1]; indices = [int(a) for a in sys.argv[2:]]
H, W, K = 256, 384, 33
with open(out, "a", newline="") as fh:
    w = csv.writer(fh)
    for index in indices:
        path = val_files()[index]
        image = read_image(path)[0]
        kernel = motion_kernel(K, seed=EVAL_SEEDS.start + index)
        top = (image.shape[-2] - (H + K - 1)) // 2; left = (image.shape[-1] - (W + K - 1)) // 2
        scene = image[:, top:top + H + K - 1, left:left + W + K - 1]
        sharp = scene[:, K // 2:K // 2 + H, K // 2:K // 2 + W]
        clean = blur(scene, kernel, boundary="valid")
        g = torch.Generator().manual_seed(10_000 * index + 10)
        blurry = clean + 10 / 255 * torch.randn(sharp.shape, generator=g)
        base = float(psnr(blurry.clamp(0, 1), sharp))
        for name, extra in (("crops+tiles", {}), ("whole", {"full_diffusion": True})):
            t = time.time()
            r = run(blurry, 10 / 255, kernel_size=K, seed=0, progress=False, **extra)
            w.writerow([path.stem, name, f"{float(psnr(r.image, sharp)) - base:.3f}",
                        f"{float(kernel_mse(r.kernel, kernel)):.3g}", f"{time.time() - t:.1f}",
                        r.info["path"]])
            fh.flush()
