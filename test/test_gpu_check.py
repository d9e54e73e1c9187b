"""benchmark/gpu_check.py on a machine without CUDA: one clear line, a non-zero exit, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_without_cuda_exits_with_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmark.gpu_check", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "gpu-check needs a CUDA GPU: torch.cuda.is_available() is False on this machine"]
    assert not (tmp_path / "out").exists()
