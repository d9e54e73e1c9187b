"""One prepared check of the CUDA path: `make gpu-check OUT=folder` (python -m benchmark.gpu_check OUT).

On a CUDA machine, in a few minutes and on the demo checkpoints only (no downloads), it runs:
  1. kernels: every Triton kernel against its torch twin on the GPU (test/common/triton_check.py cuda);
  2. parity: the pipeline parity tests (test/test_pipeline_parity.py; the pipeline picks CUDA when it
     is there, and replays decode steps from CUDA graphs): fp32 token-exact against transformers, bf16
     by teacher-forced agreement;
  2b. graphs: decode through captured CUDA graphs against op by op, same tokens, both speeds
     (benchmark/graph_check.py);
  3. serving: the server (`--enable_multimodal --tp 1`) on the demo checkpoint, a short load at
     concurrency 1 and 32 (benchmark/serve.py): throughput, TTFT and TPOT (serve_c*.json);
  4. memory: torch.cuda.max_memory_allocated of one short pipeline generation;
and writes report.json and report.md to OUT.

Needs: an NVIDIA GPU with CUDA, torch built with CUDA, triton, and this repo's test requirements
(pytest, transformers, aiohttp). Nothing is downloaded. Without CUDA it prints one line and exits 2.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests
import torch

from lightvlm.common.ports import free_ports

REPO = Path(__file__).resolve().parent.parent
STEP_TIMEOUT_S = 80  # each of six parts, so that the whole stays under 8 minutes


def run_step(name: str, command: list[str], env: dict | None = None) -> dict:
    """Run one part in its own interpreter; its exit status, its time and the tail of its output."""
    start = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=STEP_TIMEOUT_S,
                              env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
        ok = proc.returncode == 0
        output = proc.stdout if ok else proc.stdout + proc.stderr  # a passing part's stderr is progress bars
    except subprocess.TimeoutExpired as exc:
        ok, output = False, f"timed out after {STEP_TIMEOUT_S}s\n{exc.stdout or ''}"
    return {"name": name, "ok": ok, "seconds": round(time.monotonic() - start, 1), "tail": output[-3000:]}


def kernel_step() -> dict:
    return run_step("kernels", [sys.executable, "test/common/triton_check.py", "cuda"])


def parity_step() -> dict:
    return run_step("parity", [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               "test/test_pipeline_parity.py"])


def graph_step() -> dict:
    return run_step("graphs", [sys.executable, "-m", "benchmark.graph_check"])


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not become healthy (exit status {server.poll()})")


def serve_step(out: Path) -> dict:
    """The server on the demo checkpoint, a short load at concurrency 1 and then 32."""
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "lightvlm.server.api_server", "--enable_multimodal", "--tp", "1",
                               "--port", str(port)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_healthy(url, server)
        steps = [run_step(f"serve c={c}", [sys.executable, "-m", "benchmark.serve", "--url", url,
                                           "--num_requests", str(max(8, c)), "--concurrency", str(c),
                                           "--output_tokens", "32", "--json", str(out / f"serve_c{c}.json")])
                 for c in (1, 32)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    return steps


def memory_step() -> dict:
    """The peak GPU memory of one short pipeline generation on the demo checkpoint."""
    code = ("import torch; from lightvlm.models.demo import demo_checkpoint; "
            "from lightvlm.pipeline import GenerationConfig, pipeline; "
            "pipeline(demo_checkpoint())('hello', gen_config=GenerationConfig(max_new_tokens=8)); "
            "print('max_memory_allocated MiB', torch.cuda.max_memory_allocated() // 2**20)")
    return run_step("memory", [sys.executable, "-c", code])


def write_report(out: Path, steps: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(steps, indent=2))
    lines = ["# GPU check", "", f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
             "", "| part | ok | seconds |", "|---|---|---|"]
    lines += [f"| {s['name']} | {'yes' if s['ok'] else 'NO'} | {s['seconds']} |" for s in steps]
    for s in steps:
        lines += ["", f"## {s['name']}", "", "```", s["tail"].strip()[-1500:], "```"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for report.md and report.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU: torch.cuda.is_available() is False on this machine", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    steps = [kernel_step(), parity_step(), graph_step(), *serve_step(args.out), memory_step()]
    write_report(args.out, steps)
    print((args.out / "report.md").read_text())
    return 0 if all(s["ok"] for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
