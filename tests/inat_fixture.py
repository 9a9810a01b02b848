"""Synthetic image trees in the iNaturalist 2018 and class-folder layouts, for tests.

Why synthetic: real iNat images are 300 GB and licensed per image; the readers and the
pipeline only need the layout, long-tailed counts (zeros included), odd image sizes and some
corrupt files. Each maker returns the rows a reader should give, so tests assert exactly.
Images are random noise JPEGs (PNGs for some folder files), encoded with TensorFlow.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np

# Not in sorted order, so a test sees supercategory indices remapped to sorted names.
SUPERCATEGORIES = ("Plantae", "Insecta", "Aves", "Fungi", "Animalia")
_KINGDOM = {"Plantae": "Plantae", "Fungi": "Fungi"}
# Folder-tree file extensions, cycled: mixed case and PNG exercise the extension matching.
FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".JPG", ".png")


def make_inat_tree(root, counts: Sequence[int], *, val_per_class: int | Sequence[int] = 1,
                   corrupt: Iterable[tuple[str, int]] = (), seed: int = 0,
                   sizes: tuple[int, int] = (5, 60)) -> dict:
  """Writes <root>/{train,val}2018.json and <root>/train_val2018/<super>/<id>/<hex>.jpg.

  counts[c]: train images of category id c (zeros allowed). val_per_class: val images per
  class, an int for every class with train images, or a per-class sequence. corrupt:
  (split, row) pairs, split "train" or "val" and row an index into the expected rows, whose
  files get garbage (alternately a JPEG cut in half and random bytes). The JSON lists are
  shuffled and image ids random, so a reader must sort by id itself.

  Returns {"num_classes", "class_names", "supercategory_names", "train": rows, "val": rows},
  rows being {"json": path, "ids", "paths", "labels", "supercategories" (numpy, in image-id
  order), "corrupt": [paths], "sizes": [(height, width)]}.
  """
  root = str(root)
  rng = np.random.default_rng(seed)
  counts = [int(c) for c in counts]
  num_classes = len(counts)
  if isinstance(val_per_class, int):
    val_counts = [val_per_class if c else 0 for c in counts]
  else:
    val_counts = [int(c) for c in val_per_class]
  if len(val_counts) != num_classes or min(counts + val_counts) < 0:
    raise ValueError("counts and val_per_class need one non-negative count per class")
  supers = [SUPERCATEGORIES[c % len(SUPERCATEGORIES)] for c in range(num_classes)]
  super_names = tuple(sorted(set(supers)))
  class_names = tuple(f"Genus{c} species{c}" for c in range(num_classes))
  categories = [
      {"id": c, "name": class_names[c], "supercategory": supers[c],
       "kingdom": _KINGDOM.get(supers[c], "Animalia"), "genus": f"Genus{c}"}
      for c in rng.permutation(num_classes).tolist()]

  total = sum(counts) + sum(val_counts)
  ids = iter(rng.choice(10 * total + 10, total, replace=False).tolist())
  corrupt = {(split, int(row)) for split, row in corrupt}
  unknown = {split for split, _ in corrupt} - {"train", "val"}
  if unknown:
    raise ValueError(f"corrupt splits must be 'train' or 'val', not {sorted(unknown)}")
  out = {"num_classes": num_classes, "class_names": class_names,
         "supercategory_names": super_names}
  for split, split_counts in (("train", counts), ("val", val_counts)):
    labels = np.repeat(np.arange(num_classes), split_counts)
    image_ids = np.array([next(ids) for _ in labels], np.int64)
    order = np.argsort(image_ids)
    image_ids, labels = image_ids[order], labels[order]
    names = [f"train_val2018/{supers[c]}/{c}/{rng.bytes(16).hex()}.jpg" for c in labels]
    rows = {"json": os.path.join(root, f"{split}2018.json"), "ids": image_ids,
            "paths": np.array([os.path.join(root, n) for n in names], dtype=str),
            "labels": labels.astype(np.int32),
            "supercategories": np.searchsorted(super_names, [supers[c] for c in labels])
                               .astype(np.int32),
            "corrupt": [], "sizes": []}
    bad = sorted(row for s, row in corrupt if s == split)
    if bad and not 0 <= bad[0] <= bad[-1] < len(labels):
      raise ValueError(f"corrupt {split} rows {bad} outside [0, {len(labels)})")
    nth_bad = {row: k for k, row in enumerate(bad)}
    images = []
    for row, (image_id, name, path) in enumerate(zip(image_ids, names, rows["paths"])):
      height, width = _write_image(path, rng, sizes, ".jpg", nth_bad.get(row))
      rows["sizes"].append((height, width))
      if row in nth_bad:
        rows["corrupt"].append(str(path))
      images.append({"id": int(image_id), "file_name": name, "width": width, "height": height,
                     "license": 1})
    annotations = [{"id": 10 * int(i) + 7, "image_id": int(i), "category_id": int(c)}
                   for i, c in zip(image_ids, labels)]
    shuffle = lambda items: [items[k] for k in rng.permutation(len(items))]
    with open(rows["json"], "w") as f:
      json.dump({"info": {"year": 2018, "description": "synthetic"},
                 "licenses": [{"id": 1, "name": "none"}], "images": shuffle(images),
                 "annotations": shuffle(annotations), "categories": categories}, f)
    out[split] = rows
  return out


def make_folder_tree(root, counts: Sequence[int], split: str | None = None, *,
                     class_names: Sequence[str] | None = None,
                     corrupt: Iterable[int] = (), seed: int = 0,
                     sizes: tuple[int, int] = (5, 60), distractors: bool = True) -> dict:
  """Writes <root>[/<split>]/<class>/<hex>.<ext> with counts[c] images in class c's folder.

  class_names default to class_000, class_001...; they must be sorted so that label = index.
  Extensions cycle through FOLDER_EXTENSIONS. corrupt: indices into the expected rows whose
  files get garbage. distractors adds what read_folder must skip: a README.txt and a hidden
  .jpg in each class, a nested folder in the first class, a hidden folder and a labels.csv.

  Returns {"dir": the class folders' parent, "paths", "labels" (numpy, in (class, file name)
  order), "num_classes", "class_names", "corrupt": [paths], "sizes": [(height, width)]}.
  """
  rng = np.random.default_rng(seed)
  base = os.path.join(str(root), split) if split else str(root)
  class_names = tuple(class_names or (f"class_{c:03d}" for c in range(len(counts))))
  if len(class_names) != len(counts) or list(class_names) != sorted(set(class_names)):
    raise ValueError("class_names must be sorted, unique and one per count")
  rows = []
  for label, (name, count) in enumerate(zip(class_names, counts)):
    folder = os.path.join(base, name)
    os.makedirs(folder, exist_ok=True)
    files = [rng.bytes(8).hex() + FOLDER_EXTENSIONS[k % len(FOLDER_EXTENSIONS)]
             for k in range(count)]
    rows += [(label, os.path.join(folder, f)) for f in sorted(files)]
    if distractors:
      with open(os.path.join(folder, "README.txt"), "w") as f:
        f.write("not an image\n")
      _write_image(os.path.join(folder, ".hidden.jpg"), rng, sizes, ".jpg")
      if label == 0:
        os.makedirs(os.path.join(folder, "nested"))
        _write_image(os.path.join(folder, "nested", "deeper.jpg"), rng, sizes, ".jpg")
  if distractors:
    os.makedirs(os.path.join(base, ".cache", "fake_class"))
    _write_image(os.path.join(base, ".cache", "fake_class", "a.jpg"), rng, sizes, ".jpg")
    with open(os.path.join(base, "labels.csv"), "w") as f:
      f.write("path,label\n")
  bad = sorted(int(k) for k in corrupt)
  if bad and not 0 <= bad[0] <= bad[-1] < len(rows):
    raise ValueError(f"corrupt rows {bad} outside [0, {len(rows)})")
  out = {"dir": base, "paths": np.array([p for _, p in rows], dtype=str),
         "labels": np.array([label for label, _ in rows], np.int32),
         "num_classes": len(class_names), "class_names": class_names, "corrupt": [],
         "sizes": []}
  nth_bad = {row: k for k, row in enumerate(bad)}
  for row, (_, path) in enumerate(rows):
    ext = os.path.splitext(path)[1].lower()
    out["sizes"].append(_write_image(path, rng, sizes, ext, nth_bad.get(row)))
    if row in nth_bad:
      out["corrupt"].append(path)
  return out


def _write_image(path: str, rng: np.random.Generator, sizes: tuple[int, int], ext: str,
                 corrupt: int | None = None) -> tuple[int, int]:
  """A random non-square noise image at `path`, or garbage if `corrupt` (the how-many-th
  corrupt file): even ones the encoding cut in half, odd ones random bytes."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  Only when a tree is made.

  low, high = sizes
  if high <= low:
    raise ValueError(f"sizes {sizes} must allow two different sides")
  height, width = rng.choice(np.arange(low, high + 1), 2, replace=False).tolist()
  pixels = rng.integers(0, 256, [height, width, 3], dtype=np.uint8)
  if ext == ".png":
    data = tf.io.encode_png(pixels).numpy()
  else:
    data = tf.io.encode_jpeg(pixels, quality=75).numpy()
  if corrupt is not None:
    data = data[:len(data) // 2] if corrupt % 2 == 0 else rng.bytes(max(len(data) // 4, 16))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return height, width
