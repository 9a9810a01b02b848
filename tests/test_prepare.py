"""Offline TFDS build of iNaturalist 2018 (pmsn_jax.data.prepare) on tiny synthetic archives.

The archives mimic the real release's layout and file names (real iNat images may not be
redistributed, so the JPEGs are random noise): train_val2018.tar.gz holds
train_val2018/<supercategory>/<category_id>/<key>.jpg for both train and validation images,
test2018.tar.gz holds test2018/<key>.jpg, and each JSON sits alone in its own .tar.gz. The build
runs with sockets blocked, so any attempt to download fails the test.
"""
from __future__ import annotations

import io
import json
import socket
import tarfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from pmsn_jax.data import prepare

NAME = "i_naturalist2018"
# Category ids used by the synthetic images, with images per category: long-tailed train, 1 val
# image per category. Ids span the whole range so label lookups are checked at both ends.
TRAIN_COUNTS = {0: 4, 4321: 2, 8141: 1}
NUM_TEST = 2


def _stock_names(filename: str) -> list[str]:
  path = tfds.core.tfds_path(f"image_classification/i_naturalist2018/{filename}")
  return path.read_text().splitlines()


def _jpeg(rng: np.random.Generator) -> tuple[bytes, tuple[int, int]]:
  h, w = rng.integers(8, 24, size=2)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
  return buf.getvalue(), (int(h), int(w))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _write_json_archive(path, name: str, obj) -> None:
  with tarfile.open(path, "w:gz") as tar:
    _add(tar, name, json.dumps(obj).encode())


def write_synthetic_archives(archives) -> dict:
  """Writes the five archives; returns {split: {key: (label, supercategory, (h, w))}}."""
  rng = np.random.default_rng(0)
  labels = _stock_names("inaturalist2018_labels.txt")
  supers = _stock_names("inaturalist2018_supercategories.txt")
  # categories.json carries the real species names (the builder's labels); the train/val JSONs
  # carry each category's supercategory. Both are indexed by category id, as in the release.
  super_of = [supers[c % len(supers)] for c in range(len(labels))]
  categories = [{"id": c, "name": labels[c], "kingdom": "k", "phylum": "p", "class": "c",
                 "order": "o", "family": "f", "genus": "g"} for c in range(len(labels))]
  coco_categories = [{"id": c, "name": f"{super_of[c]} {c}", "supercategory": super_of[c]}
                     for c in range(len(labels))]
  archives.mkdir(parents=True)
  expected = {"train": {}, "validation": {}, "test": {}}
  annotations = {"train": {"images": [], "annotations": [], "categories": coco_categories},
                 "validation": {"images": [], "annotations": [], "categories": coco_categories}}
  with tarfile.open(archives / "train_val2018.tar.gz", "w:gz") as tar:
    for split, counts in (("train", TRAIN_COUNTS), ("validation", dict.fromkeys(TRAIN_COUNTS, 1))):
      for category, n in counts.items():
        for _ in range(n):
          key = rng.bytes(16).hex()
          file_name = f"train_val2018/{super_of[category]}/{category}/{key}.jpg"
          data, hw = _jpeg(rng)
          _add(tar, file_name, data)
          image_id = len(annotations[split]["images"])
          annotations[split]["images"].append({"id": image_id, "file_name": file_name,
                                               "height": hw[0], "width": hw[1]})
          annotations[split]["annotations"].append({"id": image_id, "image_id": image_id,
                                                    "category_id": category})
          expected[split][key] = (category, supers.index(super_of[category]), hw)
  with tarfile.open(archives / "test2018.tar.gz", "w:gz") as tar:
    for _ in range(NUM_TEST):
      key = rng.bytes(16).hex()
      data, hw = _jpeg(rng)
      _add(tar, f"test2018/{key}.jpg", data)
      expected["test"][key] = (-1, -1, hw)
  _write_json_archive(archives / "train2018.json.tar.gz", "train2018.json", annotations["train"])
  _write_json_archive(archives / "val2018.json.tar.gz", "val2018.json",
                      annotations["validation"])
  _write_json_archive(archives / "categories.json.tar.gz", "categories.json", categories)
  return expected


@pytest.fixture
def no_network(monkeypatch):
  """Makes any connection or DNS lookup raise, so a download attempt fails loudly."""
  def refuse(*args, **kwargs):
    raise OSError(f"network access attempted in an offline test: {args[1:]}")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_prepare_builds_the_stock_dataset_offline(tmp_path, no_network):
  archives, data_dir = tmp_path / "archives", tmp_path / "tfds"
  expected = write_synthetic_archives(archives)

  sizes = prepare.prepare(NAME, str(archives), str(data_dir))

  assert sizes == {split: len(examples) for split, examples in expected.items()}
  builder = tfds.builder(NAME, data_dir=str(data_dir), try_gcs=False)
  assert builder.info.features["label"].num_classes == 8142
  assert builder.info.features["supercategory"].num_classes == 14
  for split in ("train", "validation"):
    ds = tfds.load(NAME, data_dir=str(data_dir), split=split, try_gcs=False, download=False)
    got = {ex["id"].decode(): (int(ex["label"]), int(ex["supercategory"]), ex["image"].shape[:2])
           for ex in tfds.as_numpy(ds)}
    assert got == expected[split], split

  # A re-run finds the prepared dataset and needs neither the archives nor a rebuild.
  for f in archives.iterdir():
    f.unlink()
  assert prepare.prepare(NAME, str(archives), str(data_dir)) == sizes


def test_missing_archives_is_one_line_naming_files_and_source(tmp_path):
  (tmp_path / "train2018.json.tar.gz").write_bytes(b"")
  (tmp_path / "val2018.json.tar.gz").write_bytes(b"")
  with pytest.raises(prepare.MissingArchivesError) as e:
    prepare.prepare(NAME, str(tmp_path), str(tmp_path / "tfds"))
  msg = str(e.value)
  assert "\n" not in msg
  assert ": train_val2018.tar.gz, test2018.tar.gz, categories.json.tar.gz (" in msg
  assert "https://ml-inat-competition-datasets.s3.amazonaws.com/2018/" in msg


def test_offline_builder_keeps_stock_identity(tmp_path):
  cls = prepare.offline_builder_cls(prepare.SOURCES[NAME], tmp_path / "checksums.tsv")
  stock = prepare.SOURCES[NAME].builder_cls
  assert cls.name == stock.name and cls.VERSION == stock.VERSION
  # Not registered: the name still resolves to the stock builder.
  assert tfds.builder_cls(NAME) is stock
