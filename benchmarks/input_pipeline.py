"""Throughput of the multi-crop training input pipeline (pipeline.train_batches) on this host.

  python benchmarks/input_pipeline.py [--setting=official] [--jpeg_dir=/tmp/pmsn_jpegs]
  python benchmarks/input_pipeline.py --setting=demo [--step_img_per_s=220]

Why: the train step only pays off if the host can feed it. This times the pipeline alone, as
training calls it (same function, same config), in images/s: warm-up batches first (graph
tracing, thread pools), then `--batches` batches per repeat, the best of `--repeats` reported.

  * official: configs/common.py's views (target + anchor 224, 10 focal 96, colour jitter,
    grayscale, 23-tap blur at 224) from JPEG files read through an ImageFiles catalog (each file
    read, only the crop's covering window decoded). The files are synthetic stand-ins for
    iNaturalist: long side 720-880 px, aspect 0.6-1.0, smooth random content saved at quality
    90 (~110 kB mean, as photos; pure noise would make decoding unrealistically slow). They go
    to a temporary folder, or to --jpeg_dir, which a later run (and
    benchmarks/torchvision_reference.py, MSN's torchvision chain) reuses as they are.
  * demo: configs/demo.py's views (28 px, 6 focal 14) of in-memory Fashion-MNIST (random
    uint8 images of its shape when the dataset is not installed; the output says which) at the
    demo's batch size, compared with the train step's img/s (`--step_img_per_s`, from
    benchmarks/train_step.py --config=configs/demo.py): a ratio > 1 means the pipeline keeps up.

The last line is machine-readable:
  setting=<s> img_per_s=<x> batch=<b> cores=<n>
"""

from __future__ import annotations

import glob
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up banner drowns the figures.

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

from configs import common, demo  # noqa: E402
from pmsn_jax.data import pipeline, sources  # noqa: E402
from pmsn_jax.data.catalog import ImageFiles  # noqa: E402

_SETTING = flags.DEFINE_enum("setting", "official", ["official", "demo"],
                             "official: configs/common.py views of JPEG files; demo: "
                             "configs/demo.py views of in-memory Fashion-MNIST.")
_JPEG_DIR = flags.DEFINE_string("jpeg_dir", "", "official: folder of *.jpg to read; written "
                                "first (--num_files synthetic JPEGs) if it has none. Empty: a "
                                "temporary folder, deleted afterwards.")
_NUM_FILES = flags.DEFINE_integer("num_files", 200, "Synthetic JPEGs to write.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "0: 64 (official), the demo's 128 (demo).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed batches first.")
_BATCHES = flags.DEFINE_integer("batches", 0, "Timed batches per repeat; 0: 10 (official), "
                                "40 (demo).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timing repeats; the best is reported.")
_STEP_IMG_PER_S = flags.DEFINE_float("step_img_per_s", 220.0, "demo: the train step's img/s "
                                     "on this machine (benchmarks/train_step.py), for the ratio.")
_SEED = flags.DEFINE_integer("seed", 0, "Pipeline seed (and the synthetic images').")


def write_jpegs(directory: str, count: int, seed: int) -> None:
  """`count` iNat-like JPEGs: long side 720-880, aspect 0.6-1.0 either way round, quality 90.

  Content is two octaves of bicubically upsampled uniform noise (cells of 8 and 32 px): smooth
  like a photo, so the files are ~70-170 kB and decode at a photo's speed.
  """
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    long = int(rng.integers(720, 881))
    short = int(round(long * rng.uniform(0.6, 1.0)))
    h, w = (long, short) if rng.random() < 0.5 else (short, long)
    image = np.zeros([h, w, 3], np.float32)
    for weight, cell in ((0.4, 8), (0.6, 32)):
      noise = rng.integers(0, 256, [max(2, h // cell), max(2, w // cell), 3], np.uint8)
      image += weight * np.asarray(Image.fromarray(noise).resize((w, h), Image.BICUBIC),
                                   np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8)).save(
        buffer, "JPEG", quality=90)
    with open(os.path.join(directory, f"img_{i:05d}.jpg"), "wb") as f:
      f.write(buffer.getvalue())


def jpeg_catalog(directory: str) -> ImageFiles:
  """Every *.jpg under `directory` as a one-class catalog (labels are diagnostics only)."""
  paths = sorted(glob.glob(os.path.join(directory, "**", "*.jpg"), recursive=True))
  if not paths:
    raise FileNotFoundError(f"no *.jpg under {directory}")
  return ImageFiles(paths=np.asarray(paths, dtype=str),
                    labels=np.zeros(len(paths), np.int32), num_classes=1)


def describe_jpegs(files: ImageFiles) -> str:
  kb = [os.path.getsize(p) / 1e3 for p in files.paths]
  sides = []
  for p in files.paths[:50]:
    with Image.open(p) as im:  # Header only.
      sides.append(max(im.size))
  return (f"{len(files)} JPEGs, {np.mean(kb):.0f} kB mean ({np.min(kb):.0f}-{np.max(kb):.0f}), "
          f"long side {np.mean(sides):.0f} px mean")


def demo_images() -> tuple[sources.LabelledImages, str]:
  """The demo's Fashion-MNIST train split in memory, or random uint8 images of its shape."""
  config = demo.get_config()
  try:
    return (sources.load_source(config.data.source, config.data.train_split),
            "Fashion-MNIST train split (idx:)")
  except FileNotFoundError:
    rng = np.random.default_rng(_SEED.value)
    images = rng.integers(0, 256, [60_000, 28, 28, 1], np.uint8)
    return (sources.LabelledImages(images, rng.integers(0, 10, 60_000).astype(np.int32), 10),
            "RANDOM uint8 [60000,28,28,1] (Fashion-MNIST not installed)")


def images_per_second(batches, batch: int, warmup: int, num: int, repeats: int) -> list[float]:
  """img/s of each repeat of `num` consecutive batches, after `warmup` untimed ones.

  The consumer takes each batch as soon as it is ready, so the prefetch buffer is empty in the
  steady state and a repeat times production, not a backlog built up during warm-up.
  """
  for _ in range(warmup):
    next(batches)
  rates = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(num):
      next(batches)
    rates.append(batch * num / (time.perf_counter() - t))
  return rates


def run(setting: str, data, cfg, batch: int, what: str) -> float:
  num = _BATCHES.value or (10 if setting == "official" else 40)
  batches = pipeline.train_batches(data, cfg, global_batch_size=batch, seed=_SEED.value)
  rates = images_per_second(batches, batch, _WARMUP.value, num, _REPEATS.value)
  print(f"setting={setting} data: {what}")
  print(f"views: {cfg.image_size}px x2 + {cfg.num_focal} x {cfg.focal_size}px, channels "
        f"{cfg.channels}; batch {batch}; {_WARMUP.value} warm-up + {_REPEATS.value} x {num} "
        f"timed batches")
  print("img/s per repeat: " + " ".join(f"{r:.1f}" for r in rates))
  load = " ".join(f"{x:.2f}" for x in os.getloadavg())
  print(f"load average (1/5/15 min) after: {load}")
  return max(rates)


def main(argv):
  del argv
  setting = _SETTING.value
  if setting == "official":
    cfg = common.get_base_config().data
    cfg.channels = 3
    batch = _BATCH_SIZE.value or 64
    with tempfile.TemporaryDirectory(prefix="pmsn_jpegs_") as tmp:
      directory = _JPEG_DIR.value or tmp
      if not glob.glob(os.path.join(directory, "**", "*.jpg"), recursive=True):
        t = time.perf_counter()
        write_jpegs(directory, _NUM_FILES.value, _SEED.value)
        print(f"wrote {_NUM_FILES.value} synthetic JPEGs to {directory} in "
              f"{time.perf_counter() - t:.1f}s")
      files = jpeg_catalog(directory)
      best = run(setting, files, cfg, batch, f"{describe_jpegs(files)} in {directory}")
  else:
    config = demo.get_config()
    cfg = config.data
    batch = _BATCH_SIZE.value or config.batch_size
    data, what = demo_images()
    best = run(setting, data, cfg, batch, f"{what}, {len(data)} images")
    print(f"pipeline/step ratio={best / _STEP_IMG_PER_S.value:.1f} (train step "
          f"{_STEP_IMG_PER_S.value:.0f} img/s from --step_img_per_s)")
  print(f"setting={setting} img_per_s={best:.1f} batch={batch} cores={os.cpu_count()}")


if __name__ == "__main__":
  app.run(main)
