"""Sharded training (design §11) on 8 forced CPU devices: the losses of one device, params and
optimizer state really split, checkpoints that move between mesh shapes. The 8-device runs happen
in one subprocess (`sharded_run.py`): XLA's device count is fixed when jax starts."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, micro_config, write_corpus
from stackwise_jax import ConfigError
from stackwise_jax.sharding import logical_axes, make_mesh


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sharded")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  out = tmp / "report.json"
  subprocess.run([sys.executable, str(REPO / "tests" / "sharded_run.py"), write_corpus(tmp),
                  str(out), str(tmp)], env=env, cwd=REPO / "tests", check=True,
                 capture_output=True, timeout=900)
  return json.loads(out.read_text())


# fp32 trunk: only the order of the cross-device sums differs. qlora: the int4 trunk computes in
# bf16, whose rounding the changed order moves a little more.
@pytest.mark.parametrize("trunk,rtol", [("frozen", 1e-5), ("qlora", 1e-4)])
def test_two_by_four_mesh_gives_the_single_device_losses(sharded, trunk, rtol):
  run = sharded[trunk]
  assert sharded["devices"] == 8 and run["mesh"] == {"data": 2, "fsdp": 4}
  assert [len(s) for s in run["sharded"]] == [len(s) for s in run["single"]] == [8, 8]
  np.testing.assert_allclose(run["sharded"], run["single"], rtol=rtol)


@pytest.mark.parametrize("trunk", ["frozen", "qlora"])
def test_params_and_optimizer_state_are_split_over_fsdp(sharded, trunk):
  params, opt = sharded[trunk]["param_specs"], sharded[trunk]["opt_specs"]
  # The last stage's state: a cached step holds only its view (the new stack as `new_0`).
  new = "new_0" if trunk == "frozen" else "stack_1"
  kernel = f"stacks/{new}/blocks/0/attn/q/kernel"
  assert params[kernel] == "P('fsdp', None)"
  assert params[f"stacks/{new}/blocks/0/ffn/down/kernel"] == "P(None, 'fsdp')"
  assert params["embed_head/embed/embedding"] == "P(None, 'fsdp')"
  # Adam's mu and nu of the kernel, split like the kernel.
  moments = [spec for path, spec in opt.items() if path.endswith(kernel)]
  assert len(moments) == 2 and set(moments) == {"P('fsdp', None)"}
  split = [spec for spec in params.values() if "fsdp" in spec]
  assert len(split) >= 8, params
  if trunk == "qlora":   # the int4 trunk's kernels and its adapters are split too
    assert params["stacks/stack_0/blocks/0/attn/q/kernel/array/qvalue"] == "P('fsdp', None)"
    assert params["stacks/stack_0/blocks/0/attn/q/adapter/lora_a"] == "P('fsdp', None)"


def test_checkpoint_from_a_1x8_mesh_resumes_on_4x2_with_the_same_losses(sharded):
  run = sharded["restore"]
  assert run["mesh"] == {"data": 4, "fsdp": 2}
  np.testing.assert_allclose(run["resumed"], run["whole"], rtol=1e-5)


# --- In this process (one device). ---


def test_mesh_sizes_and_batch_are_checked_naming_the_field():
  devices = [object()] * 8   # the checks run before any device is touched
  config = micro_config()
  config.training.batch_size = 8
  for data, fsdp, needle in [(3, 1, r"mesh\.data=3"), (-1, 3, r"mesh\.fsdp=3"),
                             (-1, -1, "at most one axis"), (2, 2, "cover the 8 devices")]:
    config.mesh.data, config.mesh.fsdp = data, fsdp
    with pytest.raises(ConfigError, match=needle):
      make_mesh(config, devices)
  config.mesh.data, config.mesh.fsdp = -1, 1
  config.training.batch_size = 12
  with pytest.raises(ConfigError, match=r"training\.batch_size=12"):
    make_mesh(config, devices)
  config.training.batch_size = 8
  assert dict(make_mesh(config, jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1}


def test_logical_axes_of_each_kind_of_leaf():
  stack = "stacks/stack_0/blocks/0"
  assert logical_axes(f"{stack}/attn/q/kernel", 2) == ("embed", "hidden")
  assert logical_axes(f"{stack}/ffn/down/kernel/array/qvalue", 2) == ("hidden", "embed")
  assert logical_axes(f"{stack}/attn/o/kernel_packed", 2) == ("embed", "hidden")
  assert logical_axes(f"mu/{stack}/ffn/up/adapter/lora_a", 2) == ("embed", None)
  assert logical_axes(f"{stack}/attn_norm/scale", 1) == (None,)
