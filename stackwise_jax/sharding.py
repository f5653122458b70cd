"""Sharding (design §11): the device mesh and how every array maps onto it.

The mesh has two axes: `data` (batches split, params replicated) and `fsdp` (batches split too, and
params and optimizer state split along it). Their sizes come from `config.mesh` (-1 = the devices
the other axis leaves).

Where a param is created (model/layers.py, stack.py, rack.py) it declares the *logical* names of
its dims (`axes`: flax's `out_sharding` metadata, which the module's graphdef keeps); the leaves
that stand for or beside a kernel (nvfp4 codes, adapters) get theirs from the kernel's
(`kernel_leaf_axes`). `LOGICAL_RULES` maps a logical name to mesh axes. `param_axes` reads the
names back from a module; a param that declares none is an error naming it. Adam's mu and nu end
with their param's key path and are split like it. A dim the mesh axis does not divide is
replicated.

In the forward (inside a step traced under the mesh, `use_mesh`) activations are split over the
batch (`split_batch`), and each block's params are gathered only while that block runs
(`gathered_call`): a device holds its own share of every param plus one block's whole weights,
not the whole model. XLA inserts the collectives.

On several hosts (after `jax.distributed.initialize()`) each host reads its own share of every
batch (`DataLoader`'s shard) and `global_batch` assembles the global array from the local ones.
"""
import functools

from flax import nnx
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from stackwise_jax.errors import ConfigError
from stackwise_jax.quant import FORMATS
from stackwise_jax.trees import key_path

MESH_AXES = ("data", "fsdp")
LOGICAL_RULES = {
    "batch": ("data", "fsdp"),   # every device gets its own examples
    "embed": "fsdp",             # d_model: the axis every kernel has, split for FSDP
    "hidden": None,              # heads × head_dim, d_ff
    "vocab": None,
    "norm": None,                # a norm's scale [d_model]: small, whole on every device
    "time": None,                # the time embedding's width
}


def axes(*names) -> dict:
  """Metadata declaring a param's logical dim names (keys of LOGICAL_RULES; None: replicated),
  e.g. `nnx.Param(value, **axes("embed", "hidden"))`. The mesh is not known yet when params are
  created (they are placed later, `tree_shardings`), so flax's eager sharding is off."""
  return {"out_sharding": names, "eager_sharding": False}


# --- The leaves that stand for or beside a float kernel [in, out] -------------------------------
# Their logical axes follow from the kernel's: per dim, 0 (the kernel's `in` axis), 1 (`out`) or
# None (a dim of their own, replicated). A stored format's leaves take theirs from its row in
# quant.FORMATS (nvfp4); qwix copies the kernel's metadata onto int4's `qvalue` and `scale` itself,
# and transposes it onto the stack LoRA's `kernel_lora_a` [in, rank] and `kernel_lora_b` [rank, out].
_KERNEL_DIM = {"in": 0, "out": 1}
KERNEL_LEAF_AXES = {
    "lora_a": (0, None),              # progressive adapter (nnx.LoRA) [in, rank]
    "lora_b": (None, 1),              # [rank, out]
    **{leaf: tuple(_KERNEL_DIM.get(d) for d in dims)
       for fmt in FORMATS.values() if fmt.quantize is not None
       for leaf, (_, dims) in fmt.leaves.items()},
}


def kernel_leaf_axes(leaf: str, kernel_axes: tuple) -> dict:
  """`axes` metadata of leaf `leaf` (a key of KERNEL_LEAF_AXES) of a kernel with `kernel_axes`."""
  return axes(*(None if i is None else kernel_axes[i] for i in KERNEL_LEAF_AXES[leaf]))


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


def param_axes(module: nnx.Module) -> dict[str, tuple]:
  """{key path: logical axes} of every param of `module`, as declared where it was created.
  Raises ValueError naming a param that declares none."""
  found = {}
  for path, param in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    names = param.get_metadata().get("out_sharding")
    if names is None:
      raise ValueError(f"param {key_path(path)} has no logical axes: declare them where it is "
                       f"created (sharding.axes, or KERNEL_LEAF_AXES for a kernel's leaves)")
    found[key_path(path)] = tuple(names)
  return found


def leaf_spec(mesh, names: tuple, shape: tuple) -> PartitionSpec:
  """How an array whose dims have logical `names` is split over `mesh` (a Mesh or an
  AbstractMesh); a dim its mesh axis does not divide stays whole."""
  spec = []
  for logical, size in zip(names, shape, strict=True):
    axis = LOGICAL_RULES[logical] if logical else None
    axis_size = mesh.shape[axis] if isinstance(axis, str) else 1
    spec.append(axis if axis and size % axis_size == 0 else None)
  return PartitionSpec(*spec)


def tree_shardings(mesh: Mesh, tree, params_axes: dict[str, tuple]):
  """A NamedSharding per leaf of a params / optimizer-state / train-state pytree. `params_axes`:
  the params' logical axes by key path (`Rack.axes`). A leaf whose key path ends with a param's
  (the param, Adam's mu and nu) is split like it; the optimizer's counters and flags (scalars)
  are replicated."""

  def sharding(path, x):
    keys = key_path(path).split("/")
    for start in range(len(keys)):
      names = params_axes.get("/".join(keys[start:]))
      if names is not None:
        return NamedSharding(mesh, leaf_spec(mesh, names, np.shape(x)))
    if np.ndim(x):
      raise ValueError(f"{key_path(path)}: an array of shape {np.shape(x)} that is no param's "
                       f"(its key path ends with none); allowed: params, their moments, scalars")
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(sharding, tree)


# --- In the forward: activations split over the batch, each block's params gathered ------------


def use_mesh(mesh: Mesh):
  """Context to trace a step in: its `split_batch` and `gathered_call` see `mesh`."""
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def _traced_mesh():
  """The multi-device mesh a step is being traced under (`use_mesh`), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def split_batch(x: jax.Array) -> jax.Array:
  """x: [batch, ...], constrained to be split over the batch (data × fsdp) under a multi-device
  mesh; elsewhere x itself."""
  if _traced_mesh() is None:
    return x
  return jax.lax.with_sharding_constraint(x, batch_spec())


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather(x: jax.Array, spec: PartitionSpec) -> jax.Array:
  """x (split as `spec`) whole on every device. Its gradient goes back to `spec` (a reduce-scatter
  where the backend has one); the plain constraint's gradient would stay whole, replicated."""
  return jax.lax.with_sharding_constraint(x, PartitionSpec())


_gather.defvjp(lambda x, spec: (_gather(x, spec), None),
               lambda spec, _, grad: (jax.lax.with_sharding_constraint(grad, spec),))


def gathered_call(module: nnx.Module, *args, method: str = "__call__"):
  """module.`method`(*args) with `module`'s params whole on every device while it runs.

  Under a mesh with fsdp > 1 they are all-gathered for the forward and again in the backward,
  where the call is recomputed from its inputs once its output's gradient exists: nothing gathered
  is saved, so a device never holds every block's weights at once. Their gradients go back onto
  the split (`_gather`). Elsewhere (one device, data-parallel): the plain call.
  """
  mesh = _traced_mesh()
  if mesh is None or mesh.shape["fsdp"] == 1:
    return getattr(module, method)(*args)
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def gather(param: nnx.Variable) -> nnx.Variable:
    x = param.get_value()
    return param.replace(_gather(x, leaf_spec(mesh, param.get_metadata()["out_sharding"], x.shape)))

  def apply(params, *args):
    whole = jax.tree.map(gather, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return getattr(nnx.merge(graphdef, whole, rest), method)(*args)

  # Traced now, under whatever intercepts the call (qwix's int4 and LoRA): the backward replays
  # the trace instead of calling back into the module.
  traced, consts = jax.closure_convert(apply, params, *args)

  run = lambda consts, *inputs: traced(*inputs, *consts)
  call = jax.custom_vjp(run)

  def backward(saved, grad):
    # The barrier makes the backward's gather wait for this call's output gradient: else XLA
    # merges it into the forward's gather and keeps that alive through the step.
    saved, grad = jax.lax.optimization_barrier((saved, grad))
    return jax.vjp(run, *saved)[1](grad)

  call.defvjp(lambda *saved: (run(*saved), saved), backward)
  return call(consts, params, *args)


def step_compiler_options(mesh: Mesh) -> dict:
  """XLA options for compiling a train step on `mesh`: on XLA:CPU with several devices, the
  memory-minding scheduler, and under FSDP one all-reduce per gradient instead of one for all.

  XLA:CPU has no reduce-scatter: FSDP all-reduces a block's gradient whole, then slices it. Its
  default scheduler (ordered for concurrency) and its all-reduce combiner both put every block's
  reduction at the end of the backward, so a device held the whole gradient twice; with these it
  holds about one block's (8 forced devices, d_model 1024: 411 -> 237 MiB a device; data
  parallelism 1013 -> 863; BUILD_NOTES *comm*). GPU and TPU backends reduce-scatter and schedule
  for memory themselves; one CPU device keeps XLA's defaults (no faster or slower either way)."""
  if mesh.size == 1 or mesh.devices.flat[0].platform != "cpu":
    return {}
  options = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
  if mesh.shape["fsdp"] > 1:
    options["xla_disable_hlo_passes"] = "cpu-all-reduce-combiner"
  return options


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
