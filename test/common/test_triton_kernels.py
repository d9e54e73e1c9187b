"""Each Triton kernel against its torch twin, run by Triton's interpreter on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
CHECK = Path(__file__).with_name("triton_check.py")


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 2, 16), (6, 2, 32), (8, 8, 16), (4, 4, 20)])
@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_token_decode_attention_matches_its_twin(heads, kv_heads, dim, dtype, tolerance):
    result = subprocess.run([sys.executable, str(CHECK), str(heads), str(kv_heads), str(dim), dtype],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["max_error"] <= tolerance
