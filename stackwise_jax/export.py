"""Export of a trained rack (design §12): params as safetensors or NumPy `.npz`, with a manifest.

`DIR/params.safetensors` (or `params.npz`) holds one array per params leaf, named by its key path
(`stacks/stack_0/blocks/0/attn/q/kernel`). Dtypes neither format stores are kept as their bits:
bfloat16 as uint16, float8_e4m3fn as uint8, int4 (qwix's int4 kernels) as int8 holding the same
values. `DIR/manifest.json` says how to read them back: the config (YAML), the stack order, each
stack's spec (precision, int4 / packed NVFP4, adapters), and per array its dtype, shape and the
dtype it is stored as. `load_export` rebuilds the rack from these two files alone. A run whose
tokenizer is a file (a tokenizer.json, a trained BPE, a SentencePiece model) has that file copied
next to them, named in the manifest's "tokenizer" (`tokenizer.load_file` reads it).
"""
import json
import os

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy

from stackwise_jax.checkpoint import restore_into
from stackwise_jax.config import from_yaml, to_yaml, validate
from stackwise_jax.trees import key_path
from stackwise_jax.progressive import ProgressiveRackBuilder
from stackwise_jax.progressive.stages import replay, stack_specs
from stackwise_jax import quant

FORMATS = ("safetensors", "npz")
# dtype -> the plain dtype its values (integers) or bits (floats) are stored as
_STORED_AS = {"bfloat16": "uint16", **{dtype: plain for fmt in quant.FORMATS.values()
                                       for dtype, plain in fmt.export_as.items()}}


def export_rack(rack, n_stages: int, directory: str, fmt: str, tokenizer=None) -> str:
  """Writes `rack`'s params and manifest into `directory` (created); returns the params file.
  `n_stages`: how many stages built the rack (the loader replays them); `tokenizer`: the run's
  (data/tokenizer.py), whose file is copied there too."""
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r}: allowed: {', '.join(FORMATS)}")
  os.makedirs(directory, exist_ok=True)
  arrays, entries = {}, {}
  for path, x in jax.tree_util.tree_leaves_with_path(rack.params):
    key = key_path(path)
    x = np.asarray(x)
    stored = _STORED_AS.get(x.dtype.name)
    entries[key] = {"dtype": x.dtype.name, "shape": list(x.shape), "stored_as": stored or x.dtype.name}
    arrays[key] = _convert(x, stored) if stored else x
  path = os.path.join(directory, f"params.{fmt}")
  if fmt == "safetensors":
    safetensors.numpy.save_file(arrays, path)
  else:
    np.savez(path, **arrays)
  saved = tokenizer.save(directory) if tokenizer is not None else None
  manifest = {"format": fmt, "config": to_yaml(rack.config), "stages": n_stages,
              "tokenizer": saved and os.path.basename(saved),
              "stack_order": list(rack.order),
              "stacks": stack_specs(rack.specs),
              "params": entries}
  with open(os.path.join(directory, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
  return path


def load_export(directory: str):
  """The rack `export_rack` wrote into `directory`, from its two files alone. Raises ValueError
  naming the manifest and its field when the manifest is not one `export_rack` writes."""
  manifest_path = os.path.join(directory, "manifest.json")
  with open(manifest_path) as f:
    try:
      manifest = json.load(f)
    except ValueError as e:
      raise ValueError(f"{manifest_path}: not valid JSON ({e})") from None
  _check_manifest(manifest, manifest_path)
  path = os.path.join(directory, f"params.{manifest['format']}")
  if manifest["format"] == "safetensors":
    stored = safetensors.numpy.load_file(path)
  else:
    with np.load(path) as npz:
      stored = dict(npz)
  flat = {}
  for key, entry in manifest["params"].items():
    dtype = np.dtype(getattr(ml_dtypes, entry["dtype"], entry["dtype"]))
    x = stored[key]
    flat[tuple(key.split("/"))] = _convert(x, dtype) if entry["dtype"] in _STORED_AS else x
  config = validate(from_yaml(manifest["config"], os.path.join(directory, "manifest.json")))
  builder = ProgressiveRackBuilder(config)
  replay(builder, manifest["stacks"], manifest["stages"], source=directory)
  # As jax arrays: NNX layers given numpy arrays would compute some ops in NumPy, differently.
  params = jax.device_put(traverse_util.unflatten_dict(flat))
  builder.update_params(restore_into(builder.params, params, "export"))
  return builder.build_rack()


def _convert(x: np.ndarray, dtype) -> np.ndarray:
  """x as `dtype`: its values between integers (int4 <-> int8), its bits otherwise."""
  integers = jnp.issubdtype(x.dtype, jnp.integer) and jnp.issubdtype(dtype, jnp.integer)
  return x.astype(dtype) if integers else x.view(dtype)


_DTYPES = ("float32", "float16", "int32", "uint8", "int8", *_STORED_AS)


def _check_manifest(manifest, path: str) -> None:
  """Every field `load_export` uses, against what `export_rack` writes: the format is one of
  FORMATS (it names a file) and each array has a known dtype and a plain key path."""
  def bad(field, allowed):
    value = manifest.get(field) if isinstance(manifest, dict) else manifest
    raise ValueError(f"{path}: {field}={value!r}: allowed: {allowed}")

  if not isinstance(manifest, dict):
    bad("<top level>", "a JSON object as export_rack writes it")
  for field in ("format", "config", "stages", "stack_order", "stacks", "params"):
    if field not in manifest:
      bad(field, "present (the manifest is incomplete)")
  if manifest["format"] not in FORMATS:
    bad("format", ", ".join(map(repr, FORMATS)))
  if not isinstance(manifest["stages"], int) or manifest["stages"] < 1:
    bad("stages", "a positive int")
  if not isinstance(manifest["params"], dict):
    bad("params", "a mapping from key paths to {dtype, shape, stored_as}")
  for key, entry in manifest["params"].items():
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
      raise ValueError(f"{path}: params key {key!r}: allowed: a key path like "
                       "stacks/stack_0/blocks/0/attn/q/kernel")
    if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
      raise ValueError(f"{path}: params[{key!r}].dtype="
                       f"{entry.get('dtype') if isinstance(entry, dict) else entry!r}: "
                       f"allowed: {', '.join(_DTYPES)}")
