"""Host memory kept for reuse on a CPU (host_memory.py): an XLA:CPU program whose temporaries are
freed after every call must not fault its pages in again on the next call."""
import json
import os
import subprocess
import sys

import pytest

from stackwise_jax.host_memory import cpu_only

# A 64 MB temporary per call: the [4096, 4096] product sits between two dots, which XLA cannot
# fuse, so every call allocates and frees it. `{start}` runs first, in a fresh process.
_PROGRAM = """
import json, resource
def measure(applied=None):
  import jax, jax.numpy as jnp
  f = jax.jit(lambda x, w, v: jnp.sum((x @ w) @ v))
  x, w, v = jnp.ones((4096, 16)), jnp.ones((16, 4096)), jnp.ones((4096, 4))
  for _ in range(3):
    f(x, w, v).block_until_ready()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(5):
    f(x, w, v).block_until_ready()
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
  print(json.dumps({{"applied": applied, "faults_per_call": faults}}))
  return 0
{start}
"""
_BY_HAND = ("from stackwise_jax.host_memory import reuse_freed_host_memory\n"
            "measure(reuse_freed_host_memory())")
# The console script, with its command replaced by the measurement: it must set things up before.
_BY_THE_COMMAND = ("import stackwise_jax.cli as cli\n"
                   "cli.main = lambda started=None: measure()\n"
                   "cli.entry()")
_PAGES = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")   # of the temporary


def _faults_per_call(reuse: str, start: str = _BY_HAND) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "STACKWISE_REUSE_HOST_MEMORY": reuse}
  out = subprocess.run([sys.executable, "-c", _PROGRAM.format(start=start)], env=env,
                       capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_a_cpu_program_reuses_its_temporaries_pages_from_call_to_call():
  kept, default = _faults_per_call("1"), _faults_per_call("0")
  assert kept["applied"] and not default["applied"]
  # glibc's defaults unmap the freed temporary: every call faults all of its pages in again
  assert default["faults_per_call"] >= 0.9 * _PAGES
  assert kept["faults_per_call"] < 0.05 * _PAGES


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_the_command_keeps_freed_memory_before_jax_starts():
  assert _faults_per_call("1", _BY_THE_COMMAND)["faults_per_call"] < 0.05 * _PAGES
  assert _faults_per_call("0", _BY_THE_COMMAND)["faults_per_call"] >= 0.9 * _PAGES


def test_cpu_only_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert cpu_only()
  for platforms in ("cuda", "tpu", "cuda,cpu"):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert not cpu_only()


def test_an_installed_jax_plugin_means_an_accelerator_may_run(monkeypatch, tmp_path):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  plugin = tmp_path / "jax_plugins" / "xla_fake_gpu"   # as jax discovers GPU plugins
  plugin.mkdir(parents=True)
  (plugin / "__init__.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))
  assert not cpu_only()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")   # asked for the CPU only: the plugin is unused
  assert cpu_only()
