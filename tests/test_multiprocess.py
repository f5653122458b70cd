"""The train command on several hosts (design §11), played by two local processes of two CPU
devices each, joined by `jax.distributed.initialize` (gloo collectives): the losses of one process
with all four devices, each host's own data shard and checkpoint files, and a resume of a
checkpoint whose params were split across the hosts onto another mesh shape; and a pool-mode run
whose activation cache, kept as each host's share in host memory, is extended stage by stage."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import micro_args, write_corpus

# ~75 s of a CI worker (two processes compiling twice over): run with `python -m pytest -m slow`.
pytestmark = pytest.mark.slow

STEPS = ["--config.training.batch_size=8", "--config.training.checkpoint_every=3",
         "--config.training.keep_checkpoints=100"]
FSDP = ["--config.mesh.data=1", "--config.mesh.fsdp=4"]   # params split across both hosts
# Three stacks over one pool of batches: stage 2 builds the trunk's activation cache, stage 3
# extends it by one stack (on a CPU the cache is in host memory: each host keeps its share).
POOL = ["--config.training.data_reuse=pool", "--config.training.epochs_per_stack=2",
        "--config.training.checkpoint_every=0", "--config.training.progressive.target_stacks=3",
        "--config.mesh.data=4", "--config.mesh.fsdp=1"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train(corpus, workdir, *, processes, extra=()):
  """`stackwise-jax train` as `processes` processes sharing 4 CPU devices; returns their stderr."""
  args = [sys.executable, "-m", "stackwise_jax", *micro_args(corpus, workdir), *STEPS, *extra]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={4 // processes}"}
  if processes == 1:
    runs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)]
  else:
    address = f"localhost:{_free_port()}"
    runs = [subprocess.Popen([*args, "--distributed", "--coordinator", address,
                              "--num-processes", str(processes), "--process-id", str(i)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(processes)]
  outputs = [run.communicate(timeout=600) for run in runs]
  for run, (out, err) in zip(runs, outputs):
    assert run.returncode == 0, err[-3000:]
  return [out for out, _ in outputs], [err for _, err in outputs]


def _losses(workdir):
  return [s["losses"] for s in json.loads((workdir / "results.json").read_text())["stages"]]


def _one_and_two_hosts(tmp, extra):
  """The same run in one process ("one") and on two hosts ("two") -> (corpus, the two hosts'
  stdout, their stderr)."""
  corpus = write_corpus(tmp)
  _train(corpus, tmp / "one", processes=1, extra=extra)
  return corpus, *_train(corpus, tmp / "two", processes=2, extra=extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multiprocess")
  corpus, outs, errs = _one_and_two_hosts(tmp, FSDP)
  # Cut after step 9 (stage 2, step 3) and resume on two hosts with a data-parallel mesh.
  shutil.copytree(tmp / "two", tmp / "cut")
  shutil.rmtree(tmp / "cut" / "checkpoints" / "12")
  (tmp / "cut" / "results.json").unlink()
  _, resumed_errs = _train(corpus, tmp / "cut", processes=2,
                           extra=["--config.mesh.data=4", "--config.mesh.fsdp=1"])
  return dict(tmp=tmp, outs=outs, errs=errs, resumed_errs=resumed_errs)


def test_two_hosts_give_the_losses_of_one_process_with_all_devices(runs):
  one, two = _losses(runs["tmp"] / "one"), _losses(runs["tmp"] / "two")
  assert [len(s) for s in two] == [6, 6]
  np.testing.assert_allclose(two, one, rtol=1e-5)
  # Bits per byte counts the bytes of every host's share of the eval examples.
  bpb = [[s["eval_bits_per_byte"] for s in json.loads((runs["tmp"] / run / "results.json")
                                                      .read_text())["stages"]]
         for run in ("one", "two")]
  assert None not in bpb[0]
  np.testing.assert_allclose(bpb[1], bpb[0], rtol=1e-5)


def test_each_host_reads_its_own_data_shard_and_one_writes_the_results(runs):
  for i, err in enumerate(runs["errs"]):
    assert f"batches of 4, shard {i}/2" in err   # 8 examples a step: 4 from each host
  assert "final eval loss" in runs["outs"][0] and "final eval loss" not in runs["outs"][1]


def test_each_host_writes_its_part_of_the_checkpoint(runs):
  step = runs["tmp"] / "two" / "checkpoints" / "12"
  for item in ("params", "opt"):
    parts = sorted(p.name for p in (step / item).iterdir() if p.name.startswith("ocdbt.process_"))
    assert parts == ["ocdbt.process_0", "ocdbt.process_1"], item
  assert sorted(os.listdir(step / "data")) == ["commit_success.txt", "process_0-of-2.json",
                                                "process_1-of-2.json"]


def test_checkpoint_split_across_hosts_resumes_on_another_mesh(runs):
  assert all("resuming from" in err and "stage 2, step 3/6" in err
             for err in runs["resumed_errs"])
  np.testing.assert_allclose(_losses(runs["tmp"] / "cut"), _losses(runs["tmp"] / "two"),
                             rtol=1e-5)


@pytest.fixture(scope="module")
def pool_runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multiprocess_pool")
  _, _, errs = _one_and_two_hosts(tmp, POOL)
  return dict(tmp=tmp, errs=errs)


def test_two_hosts_extend_their_share_of_the_activation_cache_to_one_process_losses(pool_runs):
  assert all("cached activations are extended by the stacks a stage adds" in err for err in pool_runs["errs"])
  one, two = _losses(pool_runs["tmp"] / "one"), _losses(pool_runs["tmp"] / "two")
  assert [len(s) for s in two] == [12, 12, 12]
  np.testing.assert_allclose(two, one, rtol=1e-5)
