"""A causal rack as a Hugging Face Llama directory, and a Llama directory as a rack's first stacks.

Our block is Llama's decoder layer (pre-norm RMSNorm, RoPE on split halves, GQA, SwiGLU, no
biases), so the mapping is one tensor to one tensor: every block of the rack, in forward order
(prepend and append resolved), is `model.layers.N`; a kernel [in, out] is Llama's `weight`
[out, in]. Stored formats are dequantized and adapters merged (`model.rack.merged_kernel`).

Export writes tensor by tensor into shards of at most `MAX_SHARD_BYTES` (one `model.safetensors`
below it, `model-0000k-of-0000n.safetensors` and an index above it, as `save_pretrained` names
them), so host memory holds the rack and one shard. Import reads one tensor at a time too.
Neither needs torch or transformers: only safetensors and json.
"""
import contextlib
import dataclasses
import json
import os

from flax import traverse_util
import jax
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from stackwise_jax.errors import ConfigError
from stackwise_jax.model.rack import is_causal, merged_kernel

CONFIG, INDEX, RECORD = "config.json", "model.safetensors.index.json", "stackwise.json"
SINGLE_FILE = "model.safetensors"
MAX_SHARD_BYTES = 5 * 10**9      # save_pretrained's shard size before transformers 5
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
MODEL_TYPES = ("llama",)

# Per block: our param path -> Llama's name under model.layers.N. Kernels are transposed.
_NORMS = {"attn_norm/scale": "input_layernorm.weight",
          "ffn_norm/scale": "post_attention_layernorm.weight"}
_KERNELS = {"attn/q": "self_attn.q_proj.weight", "attn/k": "self_attn.k_proj.weight",
            "attn/v": "self_attn.v_proj.weight", "attn/o": "self_attn.o_proj.weight",
            "ffn/gate": "mlp.gate_proj.weight", "ffn/up": "mlp.up_proj.weight",
            "ffn/down": "mlp.down_proj.weight"}
_EMBED, _NORM, _HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def llama_incompatibility(config) -> str | None:
  """Why a rack of `config` has no Llama equivalent; None where it has one."""
  p = config.training.progressive
  if not is_causal(config):
    return (f"training.progressive.training_objective={p.training_objective!r} attends both "
            "ways, a Llama only causally")
  if p.time_interpretation == "input":
    return ("training.progressive.time_interpretation='input' feeds the time step to every block; "
            "a Llama block has no time input")
  return None


def check_exportable(config) -> None:
  """ConfigError (`export --format hf`) for a rack of `config` that has no Llama equivalent."""
  why = llama_incompatibility(config)
  if why:
    raise ConfigError(f"--format hf: {why}; --format safetensors keeps this rack as it is")


# --- export ---------------------------------------------------------------------------------------

def export_hf(rack, directory: str, *, tokenizer, dtype: str = "float32", record: dict,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """Writes `rack` into `directory` as a transformers Llama: config.json, generation_config.json,
  the safetensors weights in `dtype` ("float32" | "bfloat16"), the tokenizer's files and
  `stackwise.json` (`record`, with what was merged). Returns the weight files written."""
  from stackwise_jax.hf.tokenizer_files import write_tokenizer
  check_exportable(rack.config)
  if dtype not in DTYPES:
    raise ConfigError(f"--dtype={dtype!r}: allowed: {', '.join(DTYPES)}")
  os.makedirs(directory, exist_ok=True)
  m = rack.config.model
  special = write_tokenizer(tokenizer, directory, m.max_seq_len)
  n_layers = sum(s.n_blocks for s in rack.specs)
  _write_json(directory, CONFIG, llama_config(rack.config, n_layers, special, dtype))
  # Our sampler never picks special ids (tokenizer.sampled_ids); neither does greedy generate.
  _write_json(directory, "generation_config.json", {
      "bos_token_id": special["bos"], "eos_token_id": special["eos"],
      "pad_token_id": special["pad"], "suppress_tokens": _never_sampled(rack.config)})
  files = _write_shards(directory, _tensors(rack), DTYPES[dtype], max_shard_bytes)
  merged = [{"stack": s.name, "format": s.format.name if s.format else None,
             "stack_lora": dataclasses.asdict(s.lora) if s.lora else None,
             "progressive_lora": dataclasses.asdict(s.progressive_lora)
             if s.progressive_lora else None} for s in rack.specs]
  _write_json(directory, RECORD, {**record, "dtype": dtype, "layers": n_layers, "stacks": merged})
  return files


def llama_config(config, n_layers: int, special: dict, dtype: str) -> dict:
  """config.json of a `LlamaForCausalLM` with `n_layers` of `config.model`'s blocks."""
  m = config.model
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.d_ff,
          "num_hidden_layers": n_layers, "num_attention_heads": m.n_heads,
          "num_key_value_heads": m.n_kv_heads, "head_dim": m.d_model // m.n_heads,
          "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
          "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
          # rope_theta is transformers 4's key, rope_parameters transformers 5's.
          "rope_theta": m.rope_theta,
          "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
          "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
          "initializer_range": 0.02, "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
          "bos_token_id": special["bos"], "eos_token_id": special["eos"],
          "pad_token_id": special["pad"]}


def _never_sampled(config) -> list[int]:
  from stackwise_jax.data.tokenizer import sampled_ids
  n, excluded = sampled_ids(config)
  return sorted(set(excluded) | set(range(n, config.model.vocab_size)))


def _tensors(rack):
  """[(Llama name, shape, () -> fp32 array)] of `rack` in the order they are written."""
  head = rack.params["embed_head"]
  out = [(_EMBED, head["embed"]["embedding"].shape, lambda: head["embed"]["embedding"])]
  layer = 0
  for spec in rack.specs:
    for block in rack.params["stacks"][spec.name]["blocks"].values():
      flat = traverse_util.flatten_dict(block, sep="/")
      prefix = f"model.layers.{layer}."
      for ours, name in _NORMS.items():
        out.append((prefix + name, flat[ours].shape, lambda x=flat[ours]: x))
      for ours, name in _KERNELS.items():
        parts = ours.split("/")
        params = block[parts[0]][parts[1]]
        make = lambda spec=spec, params=params: merged_kernel(spec, params).T
        out.append((prefix + name, jax.eval_shape(make).shape, make))
      layer += 1
  out.append((_NORM, head["final_norm"]["scale"].shape, lambda: head["final_norm"]["scale"]))
  if head.get("head") is not None:
    out.append((_HEAD, head["head"]["kernel"].shape[::-1], lambda: head["head"]["kernel"].T))
  return out


def _write_shards(directory, tensors, dtype, max_shard_bytes) -> list[str]:
  """Writes `tensors` (from `_tensors`) in order into shards of at most `max_shard_bytes`
  (a tensor larger than that alone in one), each tensor made when its shard is written."""
  itemsize = np.dtype(dtype).itemsize
  shards, size = [[]], 0
  for entry in tensors:
    nbytes = int(np.prod(entry[1])) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  weight_map, total = {}, 0
  for name, shard in zip(names, shards):
    arrays = {key: np.ascontiguousarray(np.asarray(make(), np.float32).astype(dtype))
              for key, _, make in shard}
    safetensors.numpy.save_file(arrays, os.path.join(directory, name), metadata={"format": "pt"})
    total += sum(a.nbytes for a in arrays.values())
    weight_map.update(dict.fromkeys(arrays, name))
    del arrays   # one shard in host memory at a time
  if len(names) > 1:
    _write_json(directory, INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
  return [os.path.join(directory, n) for n in names]


def _write_json(directory, name, content) -> None:
  with open(os.path.join(directory, name), "w") as f:
    json.dump(content, f, indent=1)


# --- import ---------------------------------------------------------------------------------------

def read_config_json(directory: str) -> dict:
  """`directory`'s config.json, checked to be a Llama whose layers are our blocks."""
  path = os.path.join(directory, CONFIG)
  what = f"training.progressive.init_from={directory!r}"
  if not os.path.isdir(directory):
    raise ConfigError(f"{what}: no such directory")
  if not os.path.isfile(path):
    raise ConfigError(f"{what}: no {CONFIG} there; allowed: a Llama-family directory "
                      "(config.json and safetensors weights, as save_pretrained writes it)")
  try:
    with open(path) as f:
      hf = json.load(f)
  except ValueError as e:
    raise ConfigError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(hf, dict) or hf.get("model_type") not in MODEL_TYPES:
    kind = hf.get("model_type") if isinstance(hf, dict) else None
    raise ConfigError(f"{path}: model_type={kind!r}: allowed: {', '.join(map(repr, MODEL_TYPES))} "
                      "(pre-norm RMSNorm, RoPE, GQA, SwiGLU, no biases: our block)")
  required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads")
  missing = [k for k in required if not isinstance(hf.get(k), int)]
  if missing:
    raise ConfigError(f"{path}: {missing[0]}: missing or not an int")
  heads = hf["num_attention_heads"]
  rope = hf.get("rope_parameters") or {}
  unsupported = {
      "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
      "attention_bias": (hf.get("attention_bias", False), False),
      "mlp_bias": (hf.get("mlp_bias", False), False),
      "head_dim": (hf.get("head_dim") or hf["hidden_size"] // heads, hf["hidden_size"] // heads),
      "rope_scaling": (hf.get("rope_scaling"), None),
      "rope_parameters.rope_type": (rope.get("rope_type", "default"), "default")}
  for key, (value, allowed) in unsupported.items():
    if value != allowed:
      raise ConfigError(f"{path}: {key}={value!r}: allowed: {allowed!r} (our block has no other)")
  return hf


def model_fields(hf: dict) -> dict:
  """The `model.*` fields of a rack with `hf`'s (config.json) layers."""
  heads = hf["num_attention_heads"]
  kv = hf.get("num_key_value_heads") or heads
  theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
  return {"vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"],
          "d_ff": hf["intermediate_size"], "n_heads": heads, "n_kv_heads": kv,
          "attention": "mha" if kv == heads else "gqa",
          "max_seq_len": hf.get("max_position_embeddings", 2048),
          "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "rope_theta": float(theta),
          "tie_embeddings": bool(hf.get("tie_word_embeddings", True))}


def resolve_init_from(config, overridden=()):
  """`config` (a copy) with `training.progressive.init_from`'s model sizes and tokenizer.

  `model.*` fields come from its config.json; one in `overridden` (field paths the user set on
  the command line) that disagrees is a ConfigError naming it. Its tokenizer (tokenizer.json,
  else tokenizer.model) becomes `data.tokenizer` unless that was overridden. Raises ConfigError
  for a directory that is not a Llama or whose layers do not make whole stacks."""
  directory = config.training.progressive.init_from
  hf = read_config_json(directory)
  config = config.copy_and_resolve_references()
  for field, value in model_fields(hf).items():
    path = f"model.{field}"
    if path in overridden and config.model[field] != value:
      raise ConfigError(f"{path}={config.model[field]!r}: {directory}/{CONFIG} says {value!r}; "
                        f"allowed: {value!r} or no override (the sizes come from init_from)")
    config.model[field] = value
  layers, per_stack = hf["num_hidden_layers"], config.model.n_blocks_per_stack
  if layers % per_stack:
    raise ConfigError(f"model.n_blocks_per_stack={per_stack}: {directory} has {layers} layers; "
                      f"allowed: a divisor of {layers}, so that its layers make whole stacks")
  p = config.training.progressive
  if p.target_stacks <= layers // per_stack:
    raise ConfigError(f"training.progressive.target_stacks={p.target_stacks}: allowed: more than "
                      f"the {layers // per_stack} stacks imported from {directory}")
  # The imported stacks are no stage: stacks_per_stage's entries grow the rack from them.
  if layers // per_stack + sum(p.stacks_per_stage[:-1]) >= p.target_stacks:
    raise ConfigError(
        f"training.progressive.stacks_per_stage={tuple(p.stacks_per_stage)!r}: allowed: entries "
        f"before the last summing to less than the {p.target_stacks - layers // per_stack} stacks "
        f"that target_stacks={p.target_stacks} adds to the {layers // per_stack} imported from "
        f"{directory} (the last entry would never be used)")
  why = llama_incompatibility(config)
  if why:
    raise ConfigError(f"training.progressive.init_from={directory!r}: {why}")
  _weight_files(directory)   # present, before any work
  if "data.tokenizer" not in overridden:
    for name in ("tokenizer.json", "tokenizer.model"):
      if os.path.isfile(os.path.join(directory, name)):
        config.data.tokenizer = os.path.join(directory, name)
        break
  return config


def read_weights(directory: str, config) -> tuple[dict, list[list[dict]]]:
  """`directory`'s weights as our params: (embed/final norm/head as `EmbedHead` params, per
  imported stack a list of block params), fp32, read one tensor at a time."""
  hf = read_config_json(directory)
  files = _weight_files(directory)
  with contextlib.ExitStack() as opened:   # each file opened once; tensors read as needed
    where = {}
    for path in files:
      f = opened.enter_context(safetensors.safe_open(path, framework="numpy"))
      where.update(dict.fromkeys(f.keys(), f))

    def get(name):
      if name not in where:
        raise ConfigError(f"training.progressive.init_from={directory!r}: tensor {name} is "
                          f"missing from {', '.join(map(os.path.basename, files))}")
      return np.asarray(where[name].get_tensor(name), np.float32)

    return _our_params(hf, config.model.n_blocks_per_stack, get)


def _our_params(hf: dict, per_stack: int, get) -> tuple[dict, list[list[dict]]]:
  """`read_weights`' result, each Llama tensor read by `get(name)`."""
  embed_head = {"embed": {"embedding": get(_EMBED)}, "final_norm": {"scale": get(_NORM)}}
  if not model_fields(hf)["tie_embeddings"]:
    embed_head["head"] = {"kernel": get(_HEAD).T}
  blocks = []
  for layer in range(hf["num_hidden_layers"]):
    prefix = f"model.layers.{layer}."
    flat = {tuple(ours.split("/")): get(prefix + name) for ours, name in _NORMS.items()}
    flat.update({(*ours.split("/"), "kernel"): get(prefix + name).T
                 for ours, name in _KERNELS.items()})
    blocks.append(traverse_util.unflatten_dict(flat))
  stacks = [blocks[i:i + per_stack] for i in range(0, len(blocks), per_stack)]
  return embed_head, stacks


def _weight_files(directory: str) -> list[str]:
  index = os.path.join(directory, INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
  else:
    names = [SINGLE_FILE]
  paths = [os.path.join(directory, n) for n in names]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise ConfigError(f"training.progressive.init_from={directory!r}: {missing[0]} is missing; "
                      f"allowed: a directory with {SINGLE_FILE} or {INDEX} and its shards")
  return paths
