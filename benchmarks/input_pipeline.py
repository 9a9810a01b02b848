"""Throughput of the multi-crop training input pipeline (pipeline.train_batches) on this host.

  python benchmarks/input_pipeline.py [--setting=official] [--jpeg_dir=/tmp/pmsn_jpegs]
      [--cores=1,2]
  python benchmarks/input_pipeline.py --setting=demo [--step_img_per_s=220]

Why: the train step only pays off if the host can feed it. This times the pipeline alone, as
training calls it (same function, same config), in images/s: warm-up batches first (graph
tracing, thread pools), then `--batches` batches per repeat, the best of `--repeats` reported.
It also prints the bytes per image the step receives (the keys train.py sends to the devices).

Scaling: with --cores=1,2 (the default: 1 and all of this machine's cores) each count runs in
its own process pinned to that many cores (sched_setaffinity, which TensorFlow's thread pools
and the pipeline's decode parallelism follow), so the per-core figure and how it scales come
from one sitting.

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

Each pinned run's last line is machine-readable:
  setting=<s> img_per_s=<x> batch=<b> cores=<n> bytes_per_image=<y>
"""

from __future__ import annotations

import glob
import io
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up banner drowns the figures.

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

from configs import common, demo  # noqa: E402
from pmsn_jax import step  # noqa: E402
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
_CORES = flags.DEFINE_list("cores", [], "Core counts to time, each in a process pinned to that "
                           "many cores; empty: 1 and all of them. One value: this process, "
                           "pinned.")


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


def bytes_per_image(batch: dict) -> float:
  """What the step receives per image: the step's keys of a pipeline batch."""
  keys = [k for k in step.BATCH_KEYS if k in batch]
  return sum(batch[k].nbytes for k in keys) / len(batch["label"])


def run(setting: str, data, cfg, batch: int, what: str) -> tuple[float, float]:
  num = _BATCHES.value or (10 if setting == "official" else 40)
  batches = pipeline.train_batches(data, cfg, global_batch_size=batch, seed=_SEED.value)
  per_image = bytes_per_image(next(batches))
  rates = images_per_second(batches, batch, _WARMUP.value, num, _REPEATS.value)
  print(f"setting={setting} data: {what}")
  print(f"views: {cfg.image_size}px x2 + {cfg.num_focal} x {cfg.focal_size}px, channels "
        f"{cfg.channels}; batch {batch}; {_WARMUP.value} warm-up + {_REPEATS.value} x {num} "
        f"timed batches")
  print("img/s per repeat: " + " ".join(f"{r:.1f}" for r in rates))
  load = " ".join(f"{x:.2f}" for x in os.getloadavg())
  print(f"load average (1/5/15 min) after: {load}")
  print(f"to the devices: {per_image:,.0f} bytes per image ("
        + ", ".join(f"{k} {str(v.dtype)}" for k, v in next(batches).items()
                    if k in step.BATCH_KEYS) + ")")
  return max(rates), per_image


def usable_cores() -> list[int]:
  return sorted(os.sched_getaffinity(0))


def pinned_runs(counts: list[int], argv: list[str], jpeg_dir: str) -> None:
  """Runs this script once per core count, pinned to that many cores, and sums up."""
  cores = usable_cores()
  rates = {}
  for n in counts:
    if not 1 <= n <= len(cores):
      raise SystemExit(f"--cores={n}: this machine lets this process use {len(cores)} cores")
    args = [a for a in argv[1:] if not a.startswith(("--cores", "--jpeg_dir"))]
    command = [sys.executable, argv[0], f"--cores={n}", *args]
    if jpeg_dir:
      command.append(f"--jpeg_dir={jpeg_dir}")
    print(f"--- {n} core(s): {' '.join(command[1:])}", flush=True)
    out = subprocess.run(command, check=True, capture_output=True, text=True,
                         preexec_fn=lambda n=n: os.sched_setaffinity(0, cores[:n])).stdout
    print(out, end="", flush=True)
    last = dict(kv.split("=", 1) for kv in out.strip().splitlines()[-1].split())
    rates[n] = float(last["img_per_s"])
  summary = ", ".join(f"{n} core(s) {r:.1f} img/s ({r / n:.1f} per core)"
                      for n, r in rates.items())
  print(f"scaling: {summary}")
  if len(rates) > 1:
    lo, hi = min(rates), max(rates)
    print(f"{hi} cores give {rates[hi] / rates[lo]:.2f}x the img/s of {lo} (ideal {hi / lo:g}x)")


def main(argv):
  del argv  # absl has taken the flags out; pinned runs forward sys.argv's
  setting = _SETTING.value
  counts = [int(c) for c in _CORES.value] or sorted({1, len(usable_cores())})
  if len(counts) > 1:
    if setting == "official" and not _JPEG_DIR.value:
      with tempfile.TemporaryDirectory(prefix="pmsn_jpegs_") as tmp:
        write_jpegs(tmp, _NUM_FILES.value, _SEED.value)
        pinned_runs(counts, sys.argv, tmp)
    else:
      pinned_runs(counts, sys.argv, _JPEG_DIR.value)
    return
  if counts[0] > len(usable_cores()):
    raise SystemExit(f"--cores={counts[0]}: only {len(usable_cores())} usable")
  os.sched_setaffinity(0, usable_cores()[:counts[0]])
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
      best, per_image = run(setting, files, cfg, batch,
                            f"{describe_jpegs(files)} in {directory}")
  else:
    config = demo.get_config()
    cfg = config.data
    batch = _BATCH_SIZE.value or config.batch_size
    data, what = demo_images()
    best, per_image = run(setting, data, cfg, batch, f"{what}, {len(data)} images")
    print(f"pipeline/step ratio={best / _STEP_IMG_PER_S.value:.1f} (train step "
          f"{_STEP_IMG_PER_S.value:.0f} img/s from --step_img_per_s)")
  print(f"setting={setting} img_per_s={best:.1f} batch={batch} "
        f"cores={len(os.sched_getaffinity(0))} bytes_per_image={per_image:.0f}")


if __name__ == "__main__":
  app.run(main)
