"""scripts/gpu_measure.sh, the one prepared GPU call, runs while no GPU is at hand: its --dry-run
makes the same bench calls on the CPU at tiny sizes, and each writes its JSON."""
import json
import os
import subprocess

from conftest import REPO

STEPS = ("job_1b", "job_1b_300", "mfu_1b", "torch")   # the call's order


# ~2.5 minutes on 2 loaded cores (four bench processes, two train runs, two references): under the
# ~3 minutes past which it would be marked slow, so the default run catches a broken call.
def test_dry_run_runs_every_step_in_order_and_each_writes_its_json(tmp_path):
  out = tmp_path / "gpu"
  proc = subprocess.run(["bash", "scripts/gpu_measure.sh", "--dry-run", str(out)], cwd=REPO,
                        capture_output=True, text=True, timeout=1200)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, log[-3000:]
  assert "nvidia-smi" not in log
  starts = [line.split(":")[0][4:] for line in proc.stdout.splitlines()
            if line.startswith("=== ") and ": start " in line]
  assert tuple(starts) == STEPS, log[-3000:]
  for name in STEPS:
    result = json.loads((out / f"{name}.json").read_text())
    assert result["rows"] and (out / f"{name}.md").exists(), name
    assert result["machine"]["backend"] == "cpu"
  cells = [json.loads((out / f"{name}.json").read_text())["rows"][0] for name in STEPS[:2]]
  assert all(c["ours_s"] > 0 and c["reference_s"] > 0 for c in cells)   # both sides, one call
  assert not any(os.path.exists(out / f"{name}.json") for name in ("mfu_small", "memory_1b"))
