"""Sharding (design §11): the device mesh and how every array maps onto it, declared here only.

The mesh has two axes: `data` (batches split, params replicated) and `fsdp` (batches split too, and
params and optimizer state split along it). Their sizes come from `config.mesh` (-1 = the devices
the other axis leaves). An array's dims get *logical* axis names from its key path (`PARAM_AXES`;
Adam's mu and nu end with their param's path, so they match the same row); `LOGICAL_RULES` maps a
logical name to mesh axes. A dim the mesh axis does not divide, and any leaf no row names, is
replicated. The train step is jitted with these shardings; XLA inserts the collectives.

On several hosts (after `jax.distributed.initialize()`) each host reads its own share of every
batch (`DataLoader`'s shard) and `global_batch` assembles the global array from the local ones.
"""
import re

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from stackwise_jax.config import ConfigError
from stackwise_jax.quant import FORMATS
from stackwise_jax.trees import key_path

MESH_AXES = ("data", "fsdp")
LOGICAL_RULES = {
    "batch": ("data", "fsdp"),   # every device gets its own examples
    "embed": "fsdp",             # d_model: the axis every kernel has, split for FSDP
    "hidden": None,              # heads × head_dim, d_ff
    "vocab": None,
}
_IN = r"(attn/(q|k|v)|ffn/(gate|up))"   # kernels [d_model, hidden]
_OUT = r"(attn/o|ffn/down)"             # kernels [hidden, d_model]
# A kernel's dims ("in", "out") as logical axes, for each of the two groups.
_KERNEL_DIMS = ((_IN, {"in": "embed", "out": "hidden"}), (_OUT, {"in": "hidden", "out": "embed"}))
PARAM_AXES = (   # (regex searched in the key path, logical axes of the leaf's dims)
    (r"embed/embedding$", ("vocab", "embed")),
    (r"head/kernel$", ("embed", "vocab")),
    (r"time_proj/kernel$", (None, "embed")),
    (rf"{_IN}/kernel$", ("embed", "hidden")),
    (rf"{_OUT}/kernel$", ("hidden", "embed")),
    # Stored kernels' leaves (int4, nvfp4): their dims as the kernel's, from quant.FORMATS.
    *[(rf"{group}/{leaf}$", tuple(dims.get(d) for d in axes))
      for fmt in FORMATS.values() for leaf, (_, axes) in fmt.leaves.items()
      for group, dims in _KERNEL_DIMS],
    (rf"{_IN}/(kernel_lora_a|adapter/lora_a)$", ("embed", None)),
    (rf"{_OUT}/(kernel_lora_b|adapter/lora_b)$", (None, "embed")),
)


def make_mesh(config, devices=None) -> Mesh:
  """The (data, fsdp) mesh over `devices` (default: all of them, every host's)."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  data, fsdp = config.mesh.data, config.mesh.fsdp
  if data == -1 and fsdp == -1:
    raise ConfigError("mesh.data=-1 and mesh.fsdp=-1: allowed: -1 for at most one axis")
  if data == -1 and n % fsdp or fsdp == -1 and n % data:
    name, size = ("mesh.fsdp", fsdp) if data == -1 else ("mesh.data", data)
    raise ConfigError(f"{name}={size}: allowed: a divisor of the {n} devices")
  data = n // fsdp if data == -1 else data
  fsdp = n // data if fsdp == -1 else fsdp
  if data * fsdp != n:
    raise ConfigError(f"mesh.data={config.mesh.data}, mesh.fsdp={config.mesh.fsdp}: the mesh must "
                      f"cover the {n} devices exactly (data × fsdp = {n}; -1 takes the rest)")
  batch = config.training.batch_size
  if batch % n:
    raise ConfigError(f"training.batch_size={batch}: allowed: a multiple of the {n} devices of "
                      f"the mesh (each device gets the same number of examples)")
  return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def logical_axes(path: str, ndim: int) -> tuple:
  """The logical axis names of a leaf's dims (None: replicated)."""
  for pattern, axes in PARAM_AXES:
    if len(axes) == ndim and re.search(pattern, path):
      return axes
  return (None,) * ndim


def leaf_sharding(mesh: Mesh, path: str, shape: tuple) -> NamedSharding:
  spec = []
  for logical, size in zip(logical_axes(path, len(shape)), shape):
    axis = LOGICAL_RULES.get(logical) if logical else None
    axis_size = mesh.shape[axis] if isinstance(axis, str) else 1
    spec.append(axis if axis and size % axis_size == 0 else None)
  return NamedSharding(mesh, PartitionSpec(*spec))


def tree_shardings(mesh: Mesh, tree):
  """A NamedSharding per leaf of a params / optimizer-state / train-state pytree."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: leaf_sharding(mesh, key_path(path), np.shape(x)), tree)


def batch_spec() -> PartitionSpec:
  """Leading (batch) axis over every device; the rest of each array whole."""
  return PartitionSpec(LOGICAL_RULES["batch"])


def global_batch(mesh: Mesh, local):
  """This host's share of a batch (numpy, leading axis = its examples) -> global jax arrays split
  over the mesh's batch axis. On one host: the batch itself, placed on the devices."""
  return multihost_utils.host_local_array_to_global_array(local, mesh, batch_spec())


def local_batch(mesh: Mesh, global_arrays):
  """Inverse of `global_batch`: this host's share as host-local arrays."""
  return multihost_utils.global_array_to_host_local_array(global_arrays, mesh, batch_spec())


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
