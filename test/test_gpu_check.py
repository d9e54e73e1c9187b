"""benchmark/gpu_check.py on a machine without CUDA: one clear line, a non-zero exit, no traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmark.gpu_check import run_step, write_report

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


def test_report_lists_each_part_with_its_outcome_and_output(tmp_path):
    steps = [run_step("passes", [sys.executable, "-c", "print('kernel error 0.0')"]),
             run_step("fails", [sys.executable, "-c", "import sys; sys.exit('parity broke')"])]
    write_report(tmp_path, steps)
    assert [(s["name"], s["ok"]) for s in json.loads((tmp_path / "report.json").read_text())] == [
        ("passes", True), ("fails", False)]
    markdown = (tmp_path / "report.md").read_text()
    assert "| passes | yes |" in markdown and "| fails | NO |" in markdown
    assert "kernel error 0.0" in markdown and "parity broke" in markdown
