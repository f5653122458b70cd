"""Params-tree helpers shared by checkpoints, sharding, export and reports: how a leaf is named
(its key path) and how many bytes it is stored in; and many small device values read in one
transfer (`fetch_stacked`)."""
import jax
import jax.numpy as jnp
import numpy as np


def plain_keys(path) -> tuple:
  """A jax key path (DictKey, SequenceKey, GetAttrKey) or a tuple of keys -> plain keys."""
  return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def key_path(path) -> str:
  """A jax key path as `stacks/stack_0/blocks/0/attn/q/kernel`: how checkpoints, exports and
  sharding rules name a leaf."""
  return "/".join(map(str, plain_keys(path)))


def leaf_bytes(x) -> int:
  """Stored bytes of one leaf: int4 counts as half a byte (packed, as on GPU/TPU and in
  checkpoints; XLA:CPU holds one int4 value per byte)."""
  info = jnp.iinfo if jnp.issubdtype(x.dtype, jnp.integer) else jnp.finfo
  return -(-x.size * info(x.dtype).bits // 8)


def tree_bytes(tree) -> int:
  return sum(leaf_bytes(x) for x in jax.tree.leaves(tree))


def fetch_stacked(rows: list):
  """`rows` (a list of n pytrees of one structure, of device scalars) -> that pytree of numpy
  [n] arrays, each leaf in its own dtype, read in one `jax.device_get`: every copy is started
  before the host waits, once, instead of a wait per scalar. Nothing is stacked on the device:
  a stack would compile once per n, inside the timed loop."""
  host = jax.device_get(list(rows))
  return jax.tree.map(lambda *xs: np.stack(xs), *host)
