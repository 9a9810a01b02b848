"""`import pmsn_jax` sends XLA:CPU's matmuls to Eigen instead of YNNPACK (faster here:
docs/performance.md), keeping the user's own XLA_FLAGS and their own value for that flag."""

import os
import subprocess
import sys

# A fresh process: XLA reads its flags once, when JAX opens the CPU backend.
PROBE = """
import os
import pmsn_jax
import jax, jax.numpy as jnp
hlo = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile().as_text()
print(os.environ["XLA_FLAGS"])
print("__ynn_fusion" in hlo)
"""


def probe(xla_flags: str | None) -> tuple[str, bool]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                       check=True).stdout.splitlines()
  return out[-2], out[-1] == "True"


def test_import_turns_off_ynnpack_dots_and_keeps_other_flags():
  assert probe(None) == ("--xla_cpu_experimental_ynn_fusion_type=", False)
  flags, ynn = probe("--xla_force_host_platform_device_count=2")
  assert flags.split() == ["--xla_force_host_platform_device_count=2",
                           "--xla_cpu_experimental_ynn_fusion_type="]
  assert not ynn


def test_a_users_own_ynn_setting_is_kept():
  # Also shows the flag is live in this jaxlib: asked for, YNNPACK takes the dot.
  assert probe("--xla_cpu_experimental_ynn_fusion_type=dot") == (
      "--xla_cpu_experimental_ynn_fusion_type=dot", True)
