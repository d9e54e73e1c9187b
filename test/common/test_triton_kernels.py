"""Each Triton kernel against its torch twin, run by Triton's interpreter on the CPU.

All cases run in one subprocess (TRITON_INTERPRET=1 must be set before triton is imported; one
process keeps the interpreter's start-up to once): see triton_check.py for the cases.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import triton_check  # noqa: E402  (test/common is on the path: pytest puts a test's folder there)

CHECK = Path(triton_check.__file__)
REPO = CHECK.parents[2]

# The largest error allowed, relative to the largest value of the twin's output. The twin computes
# in fp32 from the same (rounded) inputs, so this bounds the kernel's own error:
TOLERANCE = {
    # fp32 sums in another order (online softmax, block sums): a few ulps of 2^-24, far below this
    "float32": 1e-5,
    # the output rounded to fp16 (half an ulp: 2^-11 ~ 4.9e-4), twice where the kernel rounds an
    # intermediate as the twin does (silu, the normalized row before the weight)
    "float16": 2e-3,
    # the interpreter casts fp32 to bf16 by truncation (a GPU rounds to nearest): a whole ulp, 2^-7,
    # and again for a rounded intermediate: 2^-6
    "bfloat16": 2**-6,
}


@pytest.fixture(scope="module")
def results() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(CHECK.parent)])}
    run = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", triton_check.CASES, ids=lambda case: case.name)
def test_kernel_matches_its_twin(case, results):
    error = results[case.name]
    assert isinstance(error, float), error  # otherwise the traceback of the case
    tolerance = 0.0 if case.is_exact else TOLERANCE[case.dtype]
    assert error <= tolerance, f"{case.name}: error {error:.3g} > {tolerance:.3g}"


def test_every_kernel_has_cases():
    """A kernel file added without cases here would go untested."""
    kernels = {path.stem for path in (REPO / "lightvlm/common/triton_kernels").glob("*.py")}
    kernels -= {"__init__", "ops"}  # ops.py is the table that selects them, not a kernel
    checked = {case.name.split("-")[0] for case in triton_check.CASES}
    assert kernels <= checked, f"kernels without interpreter cases: {sorted(kernels - checked)}"
