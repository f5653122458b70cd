"""A plain PyTorch version of our model, for `python scripts/bench.py torch`.

Written the way a PyTorch user would write the upstream design, independently of our JAX code:
pre-norm blocks (RMSNorm), RoPE on q/k, grouped-query attention through
`F.scaled_dot_product_attention`, SwiGLU, a tied LM head; a stage trains the new stack eagerly
with `torch.optim.AdamW` while the frozen trunk runs under `torch.no_grad()` every step.
`load_jax_params` copies our params in, so the bench can check both compute the same function.
Run as a script, it trains a whole progressive job as the original does (`run_job`), for
`python scripts/bench.py job`; it imports nothing of ours, so its process pays only for torch.
"""
import argparse
import json
import os
import time
import types

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


class RMSNorm(nn.Module):

  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, theta: float):
  """x: [batch, heads, seq, head_dim]; rotates the two halves of head_dim (GPT-NeoX style)."""
  half = x.shape[-1] // 2
  freqs = theta ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
  angles = (torch.arange(x.shape[-2], dtype=torch.float32, device=x.device)[:, None]
            * freqs[None, :])   # [seq, half]
  sin, cos = angles.sin(), angles.cos()
  x1, x2 = x[..., :half], x[..., half:]
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):

  def __init__(self, m):
    super().__init__()
    self.n_heads, self.n_kv_heads, self.theta = m.n_heads, m.n_kv_heads, m.rope_theta
    self.head_dim = m.d_model // m.n_heads
    kv = m.n_kv_heads * self.head_dim
    self.attn_norm, self.ffn_norm = RMSNorm(m.d_model, m.norm_eps), RMSNorm(m.d_model, m.norm_eps)
    self.q, self.k = nn.Linear(m.d_model, m.d_model, bias=False), nn.Linear(m.d_model, kv, bias=False)
    self.v, self.o = nn.Linear(m.d_model, kv, bias=False), nn.Linear(m.d_model, m.d_model, bias=False)
    self.gate = nn.Linear(m.d_model, m.d_ff, bias=False)
    self.up = nn.Linear(m.d_model, m.d_ff, bias=False)
    self.down = nn.Linear(m.d_ff, m.d_model, bias=False)

  def forward(self, x):
    b, t, d = x.shape
    h = self.attn_norm(x)
    heads = lambda y, n: y.view(b, t, n, self.head_dim).transpose(1, 2)   # [b, n, t, head_dim]
    q = rope(heads(self.q(h), self.n_heads), self.theta)
    k = rope(heads(self.k(h), self.n_kv_heads), self.theta)
    v = heads(self.v(h), self.n_kv_heads)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
    h = self.ffn_norm(x)
    return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Model(nn.Module):
  """Embedding -> stacks of blocks -> final norm -> tied head. `model_config` is our
  `config.model` (only its sizes are read)."""

  def __init__(self, model_config, n_stacks: int):
    super().__init__()
    m = model_config
    self.embed = nn.Embedding(m.vocab_size, m.d_model)
    self.stacks = nn.ModuleList(
        nn.Sequential(*[Block(m) for _ in range(m.n_blocks_per_stack)]) for _ in range(n_stacks))
    self.final_norm = RMSNorm(m.d_model, m.norm_eps)

  def logits(self, h):
    return self.final_norm(h) @ self.embed.weight.T

  def forward(self, tokens):
    h = self.embed(tokens)
    for stack in self.stacks:
      h = stack(h)
    return self.logits(h)


class StageTrainer:
  """Trains the last stack (and the final norm) of `model`; the embedding and the other stacks
  are a frozen trunk recomputed under no_grad every step."""

  def __init__(self, model: Model, lr: float, weight_decay: float, grad_clip: float,
               autocast: torch.dtype | None = None):
    self.model, self.grad_clip, self.autocast = model, grad_clip, autocast
    self.trunk, self.new = model.stacks[:-1], model.stacks[-1]
    for p in model.parameters():
      p.requires_grad_(False)
    self.params = [*self.new.parameters(), *model.final_norm.parameters()]
    for p in self.params:
      p.requires_grad_(True)
    self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)

  def step(self, tokens) -> float:
    """One CLM step on tokens [batch, seq] (int64); returns the loss."""
    with mixed_precision(tokens.device, self.autocast):
      with torch.no_grad():
        h = self.model.embed(tokens)
        for stack in self.trunk:
          h = stack(h)
      loss = clm_loss(self.model.logits(self.new(h)), tokens)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
    self.opt.step()
    return loss.item()


def mixed_precision(device, dtype: torch.dtype | None):
  """torch.autocast to `dtype` (fp32 master weights, as a PyTorch user trains in bf16), or a
  no-op for None."""
  return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def clm_loss(logits, tokens):
  """Mean cross entropy of each position's prediction of the next token."""
  return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def load_jax_params(model: Model, params) -> None:
  """Copies our rack's params (`{"embed_head": ..., "stacks": {"stack_i": ...}}`, fp32 stacks)
  into `model`; our kernels are [in, out], torch's weights [out, in]."""
  tensor = lambda x: torch.from_numpy(np.array(x, dtype=np.float32))
  with torch.no_grad():
    model.embed.weight.copy_(tensor(params["embed_head"]["embed"]["embedding"]))
    model.final_norm.weight.copy_(tensor(params["embed_head"]["final_norm"]["scale"]))
    for i, stack in enumerate(model.stacks):
      for j, block in enumerate(stack):
        p = params["stacks"][f"stack_{i}"]["blocks"][j]
        block.attn_norm.weight.copy_(tensor(p["attn_norm"]["scale"]))
        block.ffn_norm.weight.copy_(tensor(p["ffn_norm"]["scale"]))
        for name, group in (("q", "attn"), ("k", "attn"), ("v", "attn"), ("o", "attn"),
                            ("gate", "ffn"), ("up", "ffn"), ("down", "ffn")):
          getattr(block, name).weight.copy_(tensor(p[group][name]["kernel"]).T)


# --- The whole job, the way the original StackWise trains (`python scripts/bench.py job`). ---


def run_job(model_config, training: dict, pool: np.ndarray, eval_tokens: np.ndarray, n_stacks: int,
            epochs: int, workdir: str) -> list[dict]:
  """Grows `n_stacks` stacks; stage k trains stack k (and the final norm) for `epochs` epochs over
  `pool` (int [steps, batch, seq]), each epoch in a new order from (seed, stage, epoch), with the
  trunk recomputed under no_grad every step, then evaluates `eval_tokens` and saves the model
  (torch.save), as the original does at a stage's end. Runs on CUDA where torch has it. Returns
  per stage its loss and seconds."""
  torch.manual_seed(training["seed"])
  device = "cuda" if torch.cuda.is_available() else "cpu"
  # Our bf16 stacks compute in bf16; the PyTorch way to match them is autocast (GPU only: on a
  # CPU both sides run fp32 in the job's configs).
  bf16 = training["progressive"]["new_stack_precision"] == "bfloat16" and device == "cuda"
  autocast = torch.bfloat16 if bf16 else None
  model = Model(model_config, n_stacks).to(device)
  tensor = lambda x: torch.from_numpy(x.astype(np.int64)).to(device)
  stacks = list(model.stacks)
  rows = []
  for stage in range(1, n_stacks + 1):
    start = time.perf_counter()
    model.stacks = nn.ModuleList(stacks[:stage])
    trainer = StageTrainer(model, training["lr"], training["weight_decay"], training["grad_clip"],
                           autocast)
    for epoch in range(epochs):
      for j in np.random.default_rng([training["seed"], stage, epoch]).permutation(len(pool)):
        loss = trainer.step(tensor(pool[j]))
    with torch.no_grad(), mixed_precision(torch.device(device), autocast):
      batches = [tensor(b) for b in eval_tokens]
      eval_loss = np.mean([clm_loss(model(b), b).item() for b in batches])
    torch.save(model.state_dict(), os.path.join(workdir, f"stage_{stage}.pt"))
    rows.append({"stage": stage, "loss": loss, "eval_loss": float(eval_loss),
                 "seconds": time.perf_counter() - start})
  return rows


def main(argv=None) -> None:
  """python scripts/torch_reference.py JOB.json: runs `run_job` with the sizes, settings and
  token files JOB.json names, and writes its rows into JOB.json's "out" path."""
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("job")
  job = json.load(open(parser.parse_args(argv).job))
  m = types.SimpleNamespace(**job["model"])
  rows = run_job(m, job["training"], np.load(job["pool"]), np.load(job["eval"]), job["stacks"],
                 job["epochs"], job["workdir"])
  with open(job["out"], "w") as f:
    json.dump(rows, f)


if __name__ == "__main__":
  main()
