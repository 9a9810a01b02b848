"""Work directories that are local folders or object-store URLs (gs://bucket/run on a TPU pod).

Every read and write of a workdir goes through etils.epath, the path API Orbax itself uses:
local paths go to the OS, gs:// to tf.io.gfile when TensorFlow is installed (it is, for
tf.data) or to gcsfs with EPATH_USE_TF=false (how tests reach a local GCS emulator). `os.path`
calls would not do: os.path.abspath("gs://b/run") is "<cwd>/gs:/b/run", a local folder.

Object stores differ from disks in three ways this module hides:
  * no directories: nothing to create, a "folder" exists once an object is under it;
  * no append: gcsfs's mode "a" silently overwrites, so AppendFile keeps the text and rewrites
    the whole object (at most every URL_SYNC_SECONDS, and at flush/close);
  * no atomic rename: `replace` copies, then deletes.
"""

from __future__ import annotations

import os
import time

from etils import epath

# How stale an appended-to object (metrics.jsonl, prototypes.jsonl) may get on a URL workdir:
# each sync re-uploads the whole file, so not at every log step.
URL_SYNC_SECONDS = 60.0


def is_url(path) -> bool:
  """True for scheme://... paths (gs://, s3://, ...), False for local ones."""
  return "://" in os.fspath(path)


def path(p) -> epath.Path:
  """`p` as an epath.Path, relative local paths left relative (so messages show them as given)."""
  return epath.Path(os.fspath(p))


def resolve(p) -> epath.Path:
  """Local paths made absolute (Orbax wants them so); URLs unchanged."""
  p = os.fspath(p)
  return epath.Path(p if is_url(p) else os.path.abspath(p))


def read_text(p) -> str:
  return path(p).read_text()


def write_text(p, text: str) -> None:
  """Writes a whole file (an object, on a URL: it appears complete or not at all)."""
  path(p).write_text(text)


def replace(src, dst) -> None:
  """os.replace, or copy + delete where there is no rename (object stores)."""
  src, dst = path(src), path(dst)
  if is_url(src):
    dst.write_bytes(src.read_bytes())
    src.unlink()
  else:
    os.replace(src, dst)


def ensure_dir(p) -> None:
  """Creates a local directory; on a URL there is nothing to create (and creating the bucket
  is not ours to do: a missing bucket fails at the first write, with its name)."""
  if not is_url(p):
    os.makedirs(os.fspath(p), exist_ok=True)


class AppendFile:
  """A text file that grows by appended lines (metrics.jsonl, prototypes.jsonl).

  Local: an append-mode file flushed at every write, as a reader of a live run expects.
  URL: the file's text is kept here (starting from the object a previous run left) and the
  whole object is rewritten at most every `sync_seconds` and at flush()/close(); a crash loses
  at most that interval, which the resumed run logs again (readers take the last line of a
  step).
  """

  def __init__(self, p, sync_seconds: float = URL_SYNC_SECONDS):
    self.path = path(p)
    self._url = is_url(self.path)
    self._sync_seconds = sync_seconds
    self._closed = False
    if self._url:
      self._text = self.path.read_text() if self.path.exists() else ""
      self._dirty, self._last_sync = False, time.monotonic()
    else:
      self._file = open(self.path, "a")

  def write(self, text: str) -> None:
    if not self._url:
      self._file.write(text)
      self._file.flush()
      return
    self._text += text
    self._dirty = True
    if time.monotonic() - self._last_sync >= self._sync_seconds:
      self.flush()

  def flush(self) -> None:
    """Makes everything written so far visible to readers."""
    if self._closed:
      return
    if not self._url:
      self._file.flush()
    elif self._dirty:
      self.path.write_text(self._text)
      self._dirty, self._last_sync = False, time.monotonic()

  def close(self) -> None:
    """Flushes, then closes; safe to call more than once."""
    if self._closed:
      return
    self.flush()
    self._closed = True
    if not self._url:
      self._file.close()
