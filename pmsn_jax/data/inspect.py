r"""Prints what a data source holds, as one JSON object, before a long run is spent on it.

  python -m pmsn_jax.data.inspect --source=inat_json:/data/inat2018 [--split=train]
  python -m pmsn_jax.data.inspect --source=tfds:i_naturalist2018 --data_dir=gs://bucket/tfds

Keys: source, split, num_examples, num_classes, class_counts ({label: count}, zero-count classes
included), empty_classes, skipped_corrupt (images that fail to read or decode; null with
--nocheck_images, which skips decoding every image). A missing or malformed source exits with
status 2 and a one-line error.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags

from pmsn_jax.data import sources

_SOURCE = flags.DEFINE_string("source", None, "A data source string: " +
                              ", ".join(sources.SOURCE_FORMS), required=True)
_SPLIT = flags.DEFINE_string("split", "train", "Split to inspect.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (tfds: sources only).")
_CHECK = flags.DEFINE_bool("check_images", True, "Decode every image to count corrupt ones.")


def count_unreadable(data) -> int:
  """Images of a file catalog or streamed TFDS split that fail to read or decode."""
  import tensorflow as tf  # Heavy; only needed for encoded sources.

  if not data.encoded:
    return 0
  encoded = data.records().map(lambda image, _: image)
  decoded = encoded.map(
      lambda x: tf.shape(tf.io.decode_image(x, channels=3, expand_animations=False))[0],
      num_parallel_calls=tf.data.AUTOTUNE)
  readable = int(decoded.ignore_errors().reduce(np.int64(0), lambda n, _: n + 1))
  total = int(encoded.reduce(np.int64(0), lambda n, _: n + 1)) if not len(data) else len(data)
  return total - readable


def summary(source: str, split: str, *, data_dir: str | None = None,
            check_images: bool = True) -> dict:
  data = sources.load_source(source, split, data_dir=data_dir)
  counts = np.asarray(data.class_counts())
  return {
      "source": source,
      "split": split,
      "num_examples": int(counts.sum()),
      "num_classes": int(data.num_classes),
      "class_counts": {str(label): int(n) for label, n in enumerate(counts)},
      "empty_classes": int((counts == 0).sum()),
      "skipped_corrupt": count_unreadable(data) if check_images else None,
  }


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    result = summary(_SOURCE.value, _SPLIT.value, data_dir=_DATA_DIR.value,
                     check_images=_CHECK.value)
  except (ValueError, FileNotFoundError, OSError) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
