"""Sharded training (design §11) on 8 forced CPU devices: the losses of one device, params and
optimizer state really split, far fewer bytes a device under FSDP, checkpoints that move between
mesh shapes. The 8-device runs happen in one subprocess (`sharded_run.py`): XLA's device count is
fixed when jax starts. In this process: logical axes declared where every param is created."""
import json
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, micro_config, write_corpus
from stackwise_jax import ConfigError
from stackwise_jax.model import Stack
from stackwise_jax.progressive import ProgressiveRackBuilder
from stackwise_jax.sharding import make_mesh, param_axes
from stackwise_jax.trees import key_path


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


# fp32 trunk (frozen, or training): only the order of the cross-device sums differs. qlora: the
# int4 trunk computes in bf16, whose rounding the changed order moves a little more.
@pytest.mark.parametrize("trunk,rtol", [("frozen", 1e-5), ("qlora", 1e-4), ("train", 1e-5)])
def test_two_by_four_mesh_gives_the_single_device_losses(sharded, trunk, rtol):
  run = sharded[trunk]
  assert sharded["devices"] == 8 and run["mesh"] == {"data": 2, "fsdp": 4}
  assert [len(s) for s in run["sharded"]] == [len(s) for s in run["single"]] == [8, 8]
  np.testing.assert_allclose(run["sharded"], run["single"], rtol=rtol)


@pytest.mark.parametrize("trunk", ["frozen", "qlora", "train"])
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
  if trunk == "train":   # the trunk's Adam moments too
    trunk_kernel = "stacks/stack_0/blocks/0/attn/q/kernel"
    assert [spec for path, spec in opt.items() if path.endswith(trunk_kernel)] == [
        "P('fsdp', None)"] * 2


def test_fsdp_step_holds_far_fewer_bytes_a_device_than_data_parallel(sharded):
  # Params, Adam's moments and gradients dominate this step. Data parallelism holds all of them on
  # every device; FSDP an eighth of params and moments, the block it runs and about one block's
  # whole gradient (XLA:CPU all-reduces it, then slices; sharding.step_compiler_options keeps it
  # from holding every block's at once: 0.42x before, 0.29x with it). Issue 16's goal: <= 0.35x.
  held = sharded["device_bytes"]
  assert held["fsdp"] <= 0.35 * held["data-parallel"], held


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


def _axes_of(trunk_fields):
  """{key path: (shape, logical axes)} of a 2-stack rack whose first stack is trunk."""
  builder = ProgressiveRackBuilder(micro_config(progressive_qlora=True, quant_block_size=16,
                                                **trunk_fields))
  builder.add_stack()
  builder.trained.add("stack_0")
  if trunk_fields.get("trunk_strategy") == "qlora":
    builder.freeze_all_but_qlora()
  else:
    builder.freeze_trunk()
  builder.add_stack()
  rack = builder.build_rack()
  shapes = {key_path(path): np.shape(x) for path, x in jax.tree_util.tree_leaves_with_path(rack.params)}
  axes = rack.axes()
  assert set(axes) == set(shapes)   # every leaf, and no other
  assert all(len(axes[path]) == len(shape) for path, shape in shapes.items())
  return axes


def test_every_kind_of_param_declares_its_logical_axes_where_it_is_created():
  block = "stacks/stack_0/blocks/0"
  axes = _axes_of(dict(trunk_strategy="qlora", qlora_enabled=True))
  assert axes["embed_head/embed/embedding"] == ("vocab", "embed")
  assert axes[f"{block}/attn_norm/scale"] == ("norm",)
  assert axes["stacks/stack_1/blocks/0/attn/q/kernel"] == ("embed", "hidden")
  # int4 (qwix carries the kernel's axes over) and both adapters.
  assert axes[f"{block}/ffn/down/kernel/array/qvalue"] == ("hidden", "embed")
  assert axes[f"{block}/ffn/down/kernel/array/scale"] == ("hidden", "embed")
  assert axes[f"{block}/attn/q/kernel_lora_a"] == ("embed", None)
  assert axes[f"{block}/ffn/up/adapter/lora_a"] == ("embed", None)
  assert axes[f"{block}/ffn/down/adapter/lora_b"] == (None, "embed")
  # nvfp4 stores the kernel [in, out] transposed.
  axes = _axes_of(dict(new_stack_precision="nvfp4"))
  assert axes[f"{block}/attn/o/kernel_packed"] == ("embed", "hidden")
  assert axes[f"{block}/attn/q/kernel_scales"] == ("hidden", "embed")
  assert axes[f"{block}/attn/q/kernel_tensor_scale"] == ()


def test_a_param_without_logical_axes_is_an_error_naming_it():
  stack = Stack(micro_config().model, n_blocks=1, dtype=jnp.float32, causal=True, time_dim=None,
                rngs=nnx.Rngs(0))
  stack.blocks[0].ffn.extra = nnx.Param(jnp.zeros(3))
  with pytest.raises(ValueError, match=r"param blocks/0/ffn/extra has no logical axes"):
    param_axes(stack)
