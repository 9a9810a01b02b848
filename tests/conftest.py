"""Test set-up: fake 8 CPU devices before jax is imported, so sharding code paths run here."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# Keep TensorFlow (tf.data) off any accelerator and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# libtpu is a test requirement (ahead-of-time TPU compiles, tests/test_aot.py): JAX must not
# try to open a TPU here, and several processes may load libtpu at once.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# The XLA:CPU matmul setting the entry points apply (`python -m pmsn_jax.main`, --cpu_tuning),
# so tests see the numerics users' CPU runs get; the sharded k-NN's bitwise checks rely on it.
from pmsn_jax import host_setup  # noqa: E402

host_setup.use_eigen_dots()
