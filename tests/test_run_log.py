"""run_log.py: when the train loop's periodic actions run, and the parameter summary."""
import math

import jax
import pytest

from configs import demo
from pmsn_jax import program, run_log, sharding


@pytest.mark.parametrize("step,every,last,expected", [
    (4, 4, 12, True), (5, 4, 12, False), (12, 5, 12, True),  # the last step always runs
    (3, 0, None, False), (12, 0, 12, True), (10, 5, None, True), (11, 5, None, False),
])
def test_due(step, every, last, expected):
  assert run_log.due(step, every, last) is expected


def test_parameter_summary_counts_every_trained_parameter():
  config = demo.get_config("smoke")
  prog = program.build(config, sharding.make_mesh(config.mesh))
  params = prog.abstract_state.params
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  line = run_log.parameter_summary(params)
  assert line.startswith(f"model: {total / 1e6:.2f}M trained parameters (online: encoder ")
  assert "head " in line and "; prototypes" in line
