r"""Builds a TFDS dataset offline from archives the user already downloaded.

Why this exists: the stock `i_naturalist2018` builder can only get its five archives (158 GiB)
from the network, even when they sit in `manual_dir`. TFDS's download manager looks a file up in
`manual_dir` by the file name recorded in the builder's checksums file, and TFDS ships no
checksums for this dataset, so it never looks there and downloads instead. Here a subclass of the
stock builder is given checksums computed from the local archives, which makes TFDS read them from
`--archives` and never touch the network. Everything else (name, version, features, example
generation) is the stock builder's, so a later `tfds.load("i_naturalist2018", data_dir=...)`
reads the output with the stock builder.

  python -m pmsn_jax.data.prepare --dataset=i_naturalist2018 \
      --archives=/path/to/inat2018 --data_dir=gs://bucket/tensorflow_datasets

`--data_dir` may be a local directory or a gs:// bucket (TFDS writes through tf.io.gfile).
Scratch files (checksums.tsv and the three extracted JSON annotation files) go to `--work_dir`,
by default a local temporary directory removed at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import urllib.parse

from absl import app
from absl import flags
from absl import logging
from etils import epath
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums as tfds_checksums
from tensorflow_datasets.image_classification.i_naturalist2018 import (
    i_naturalist2018 as tfds_inat18,
)

FILE_FORMATS = ("tfrecord", "array_record")


@dataclasses.dataclass(frozen=True)
class OfflineSource:
  """A stock TFDS builder and the archives its `_split_generators` asks the download manager for.

  `files` must be exactly the names the builder joins onto `base_url`: the URL is the key TFDS
  looks checksums up by, and the file name is what it looks for in `manual_dir`.
  """

  builder_cls: type[tfds.core.DatasetBuilder]
  base_url: str
  files: tuple[str, ...]
  homepage: str

  def url(self, filename: str) -> str:
    return urllib.parse.urljoin(self.base_url, filename)


SOURCES = {
    "i_naturalist2018": OfflineSource(
        builder_cls=tfds_inat18.INaturalist2018,
        base_url=tfds_inat18._URL,  # pylint: disable=protected-access
        # The order the stock builder lists them; train_val2018 holds both train and validation
        # images, test2018 the unlabelled test images (the builder always writes a test split).
        files=("train_val2018.tar.gz", "train2018.json.tar.gz", "val2018.json.tar.gz",
               "test2018.tar.gz", "categories.json.tar.gz"),
        homepage="https://github.com/visipedia/inat_comp/tree/master/2018",
    ),
}


class MissingArchivesError(FileNotFoundError):
  """Some archives the builder needs are not in the archives directory."""


def missing_archives(source: OfflineSource, archives: epath.PathLike) -> list[str]:
  """File names from `source.files` that are not in `archives`."""
  return [f for f in source.files if not (epath.Path(archives) / f).exists()]


def write_checksums(source: OfflineSource, archives: epath.PathLike,
                    path: epath.PathLike) -> epath.Path:
  """Writes `path` (TFDS checksums.tsv format: url, size, sha256, file name) for the archives.

  This reads every archive once (sha256 ran at about 0.6 GiB/s on one core here), and TFDS reads
  each again to verify it when it takes it from `manual_dir`. The stock builder then reads the
  largest one, train_val2018.tar.gz, once for train and once for validation, so hashing is a
  minor share of the I/O.
  """
  infos = {}
  for name in source.files:
    archive = epath.Path(archives) / name
    logging.info("sha256 of %s (%.1f GiB)...", archive, archive.stat().length / 2**30)
    infos[source.url(name)] = tfds_checksums.compute_url_info(archive)
  path = epath.Path(path)
  tfds_checksums.save_url_infos(path, infos)
  return path


def offline_builder_cls(source: OfflineSource,
                        checksums_path: epath.PathLike) -> type[tfds.core.DatasetBuilder]:
  """The stock builder, reading its checksums from `checksums_path`.

  Why this mechanism: TFDS finds a builder's checksums through the `_checksums_path` class
  property (normally `checksums.tsv` beside the builder's module) and, given a URL's recorded
  file name, takes the file from `manual_dir` instead of downloading it, then verifies size and
  sha256. Pointing `_checksums_path` at a file written for the user's archives uses exactly that
  path through TFDS without writing into the installed package (which may be read-only and is
  shared by every user of the venv). The class is made per call because TFDS caches the parsed
  checksums per class, and it is not registered so the stock `i_naturalist2018` stays the one
  `tfds.load` finds. `name` is set explicitly: TFDS would otherwise derive it from this class name
  and write to a different directory.
  """

  class OfflineBuilder(source.builder_cls, skip_registration=True):
    name = source.builder_cls.name
    _checksums_path = epath.Path(checksums_path)

  OfflineBuilder.__name__ = OfflineBuilder.__qualname__ = f"Offline{source.builder_cls.__name__}"
  # TFDS records the builder's module in dataset_info.json and resolves files beside the builder
  # through it; the stock module keeps both as the stock builder has them (this one would write
  # "__main__" under `python -m`). Set after creation, so TFDS's per-module list of builders,
  # filled in `__init_subclass__`, still files this class under this module, not the stock one.
  OfflineBuilder.__module__ = source.builder_cls.__module__
  return OfflineBuilder


def split_sizes(builder: tfds.core.DatasetBuilder) -> dict[str, int]:
  return {name: split.num_examples for name, split in sorted(builder.info.splits.items())}


def prepare(dataset: str, archives: str, data_dir: str, *, file_format: str = "tfrecord",
            work_dir: str | None = None) -> dict[str, int]:
  """Builds `dataset` under `data_dir` from the archives in `archives`; returns split sizes.

  Does nothing but report sizes when `data_dir` already holds the prepared dataset, so a re-run
  neither needs the archives nor re-hashes them.
  """
  if dataset not in SOURCES:
    raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(SOURCES)}")
  if file_format not in FILE_FORMATS:
    raise ValueError(f"unknown file_format {file_format!r}; known: {', '.join(FILE_FORMATS)}")
  source = SOURCES[dataset]
  existing = source.builder_cls(data_dir=data_dir)
  if existing.data_path.exists() and existing.is_prepared():
    logging.info("%s is already prepared in %s", dataset, existing.data_dir)
    return split_sizes(existing)

  if missing := missing_archives(source, archives):
    raise MissingArchivesError(
        f"{dataset}: missing in {archives}: {', '.join(missing)} (download each from "
        f"{source.base_url}<name>, see {source.homepage})")

  scratch = (tempfile.TemporaryDirectory(prefix=f"{dataset}_prepare_") if work_dir is None
             else contextlib.nullcontext(work_dir))
  with scratch as work:
    work = epath.Path(work)
    work.mkdir(parents=True, exist_ok=True)
    builder_cls = offline_builder_cls(source, write_checksums(source, archives,
                                                              work / "checksums.tsv"))
    builder = builder_cls(data_dir=data_dir)
    builder.download_and_prepare(
        download_dir=work / "downloads",
        file_format=file_format,
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(archives),
            # Never fetch a prepared copy from TFDS's bucket, and fail rather than download any
            # URL the checksums do not cover.
            try_download_gcs=False,
            force_checksums_validation=True,
        ),
    )
  # Read back with the stock, registered builder: what `tfds.load` will see.
  return split_sizes(source.builder_cls(data_dir=data_dir))


def _define_flags() -> None:
  """Defines the CLI flags; only when run as a program, because absl flags are process-global and
  importing this module (tests, other tools) must not claim names such as --data_dir that other
  entry points in this package define too."""
  flags.DEFINE_enum("dataset", "i_naturalist2018", list(SOURCES), "TFDS dataset to build.")
  flags.DEFINE_string("archives", None, "Directory holding the original archives, under the "
                      "file names the TFDS builder downloads.")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir to write to: a local directory or "
                      "gs://bucket/path.")
  flags.DEFINE_enum("file_format", "tfrecord", list(FILE_FORMATS), "Record file format: "
                    "tfrecord reads with tfds.load; array_record only with tfds.data_source.")
  flags.DEFINE_string("work_dir", None, "Local scratch directory (checksums.tsv, extracted "
                      "JSON annotations); default: a temporary directory removed at the end.")
  flags.mark_flags_as_required(["archives", "data_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    sizes = prepare(f.dataset, f.archives, f.data_dir, file_format=f.file_format,
                    work_dir=f.work_dir)
  except MissingArchivesError as e:
    raise SystemExit(f"error: {e}") from None
  print(f"{f.dataset} in {f.data_dir}: " + ", ".join(f"{name} {n:,}" for name, n in sizes.items()))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
