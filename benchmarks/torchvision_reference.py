"""Reference throughput: MSN's official multi-crop augmentation (torchvision + PIL, torch
DataLoader) on a folder of JPEGs, to set benchmarks/input_pipeline.py --setting=official against.

  <venv with torch, torchvision>/bin/python benchmarks/torchvision_reference.py --jpeg_dir=/tmp/pmsn_jpegs
  (write the files first: python benchmarks/input_pipeline.py --jpeg_dir=/tmp/pmsn_jpegs)

Why a separate script in its own virtualenv: torch is no dependency of pmsn_jax, and must not
become one. This imports only torch, torchvision, PIL and numpy.

The chain is facebookresearch/msn's src/data_manager.make_transforms with configs/common.py's
values: per image, decoded whole with PIL (ImageFolder's loader), 1 target + 1 anchor of
RandomResizedCrop(224, scale=(0.3, 1.0)) and 10 focal RandomResizedCrop(96, scale=(0.05, 0.3)),
each then RandomHorizontalFlip, ColorJitter(0.4, 0.4, 0.4, 0.1) w.p. 0.8, RandomGrayscale(0.2),
MSN's PIL GaussianBlur (radius ~ U(0.1, 2.0)) w.p. 0.5, ToTensor, Normalize. A DataLoader
with --num_workers worker processes collates batches of --batch_size. Files are cycled (an
index stream much longer than the folder) so there are no epoch-boundary stalls.

Timing as input_pipeline.py: warm-up batches, then --batches per repeat, best of --repeats.
The last line is machine-readable:
  setting=torchvision img_per_s=<x> batch=<b> cores=<n> workers=<w>
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import torch
from PIL import Image, ImageFilter


def import_torchvision():
  """torchvision, even where its compiled ops cannot load.

  With only a CUDA build of torchvision beside a CPU torch (the CPU wheel index unreachable),
  torchvision's _C fails to load and its import then dies registering fake kernels for the
  undefined nms ops. Defining those two schemas lets the import finish; the transforms used
  here are pure Python over PIL and never touch the compiled ops.
  """
  try:
    import torchvision
  except RuntimeError as e:
    if "torchvision::nms" not in str(e):
      raise
    lib = torch.library.Library("torchvision", "DEF")  # Kept alive: holds the definitions.
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import_torchvision.shim = lib
    import torchvision
  return torchvision


torchvision = import_torchvision()
from torchvision import transforms  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class GaussianBlur:
  """MSN's blur: PIL's Gaussian filter, radius ~ U(radius_min, radius_max), w.p. p."""

  def __init__(self, p=0.5, radius_min=0.1, radius_max=2.0):
    self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

  def __call__(self, img):
    if torch.bernoulli(torch.tensor(self.prob)) == 0:
      return img
    radius = self.radius_min + torch.rand(1).item() * (self.radius_max - self.radius_min)
    return img.filter(ImageFilter.GaussianBlur(radius=radius))


def msn_view(size: int, scale: tuple[float, float], strength: float = 0.5):
  jitter = transforms.ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength,
                                  0.2 * strength)
  return transforms.Compose([
      transforms.RandomResizedCrop(size, scale=scale),
      transforms.RandomHorizontalFlip(),
      transforms.RandomApply([jitter], p=0.8),
      transforms.RandomGrayscale(p=0.2),
      GaussianBlur(p=0.5),
      transforms.ToTensor(),
      transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
  ])


class MultiCrop:
  """One decoded image -> [target, anchor, focal_1..focal_F] tensors."""

  def __init__(self, num_focal: int = 10):
    self.rand = msn_view(224, (0.3, 1.0))
    self.focal = msn_view(96, (0.05, 0.3))
    self.num_focal = num_focal

  def __call__(self, img):
    return [self.rand(img), self.rand(img)] + [self.focal(img) for _ in range(self.num_focal)]


class CycledJpegs(torch.utils.data.Dataset):
  """`length` indices over the files, file i % len(paths): an effectively endless epoch."""

  def __init__(self, paths, transform, length: int = 1_000_000):
    self.paths, self.transform, self.length = paths, transform, length

  def __len__(self):
    return self.length

  def __getitem__(self, i):
    with open(self.paths[i % len(self.paths)], "rb") as f:
      img = Image.open(f).convert("RGB")  # torchvision's pil_loader.
    return self.transform(img), 0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--jpeg_dir", required=True, help="folder of *.jpg (searched recursively)")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--num_workers", type=int, default=2)
  parser.add_argument("--num_focal", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--batches", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  paths = sorted(glob.glob(os.path.join(args.jpeg_dir, "**", "*.jpg"), recursive=True))
  if not paths:
    raise SystemExit(f"no *.jpg under {args.jpeg_dir}")
  torch.manual_seed(args.seed)
  loader = torch.utils.data.DataLoader(
      CycledJpegs(paths, MultiCrop(args.num_focal)), batch_size=args.batch_size, shuffle=True,
      num_workers=args.num_workers, drop_last=True, persistent_workers=args.num_workers > 0)
  batches = iter(loader)
  for _ in range(args.warmup):
    next(batches)
  rates = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    for _ in range(args.batches):
      next(batches)
    rates.append(args.batch_size * args.batches / (time.perf_counter() - t))
  print(f"torch {torch.__version__} torchvision {torchvision.__version__}; {len(paths)} JPEGs "
        f"in {args.jpeg_dir}; views 224px x2 + {args.num_focal} x 96px; batch "
        f"{args.batch_size}, {args.num_workers} workers; {args.warmup} warm-up + "
        f"{args.repeats} x {args.batches} timed batches")
  print("img/s per repeat: " + " ".join(f"{r:.1f}" for r in rates))
  load = " ".join(f"{x:.2f}" for x in os.getloadavg())
  print(f"load average (1/5/15 min) after: {load}")
  print(f"setting=torchvision img_per_s={max(rates):.1f} batch={args.batch_size} "
        f"cores={os.cpu_count()} workers={args.num_workers}")


if __name__ == "__main__":
  main()
