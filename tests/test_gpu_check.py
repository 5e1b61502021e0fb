"""bench/gpu_check.sh and its Python parts, checked on the CPU.

The script itself needs a GPU; here: its syntax, its --dry-run plan (every step capped, the
caps within 330 s), nvcc discovery, the summary's verdict, and the two Python parts run in
their CPU modes: they pass, and they fail (exit 1) when a result is wrong.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pinpoint_kernels import backends, cpu

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = ["environment", "build", "cuda-tests", "memcheck", "racecheck", "triton-tests", "benchmarks", "e2e-7b"]
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")]


def _load(name: str):
    path = ROOT / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pinpoint_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dry_run(**env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_dry_run_names_every_step_with_a_cap_within_330s():
    res = _dry_run()
    assert res.returncode == 0, res.stderr
    caps = dict(re.findall(r"^step (\S+)\s+cap\s+(\d+)s", res.stdout, re.M))
    assert list(caps) == STEPS
    total = sum(int(c) for c in caps.values())
    assert total <= 330 and f"total cap {total}s" in res.stdout
    assert "python: python3" in res.stdout  # not `python`
    text = SCRIPT.read_text()
    for step in STEPS:  # every planned step has its function
        fn = re.search(rf'"{step}\|\d+\|(\w+)\|', text).group(1)
        assert re.search(rf"^{fn}\(\) {{", text, re.M), fn
    assert "CUDA_LAUNCH_BLOCKING=1" in text and "-n 8" in text and "--tool memcheck" in text
    assert "--tool racecheck" in text
    # the kernel tests load only tests/gpu/conftest.py and no pytest-benchmark option
    assert text.count("--confcutdir=tests/gpu") == 2 and text.count('-o addopts="-ra --import-mode=importlib"') == 2


def test_dry_run_finds_nvcc_in_cuda_home_first(tmp_path):
    fake = tmp_path / "bin" / "nvcc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho fake nvcc\n")
    fake.chmod(0o755)
    res = _dry_run(CUDA_HOME=str(tmp_path), PYTHON="python3.99")
    assert res.returncode == 0
    assert f"nvcc: {fake}" in res.stdout and "python: python3.99" in res.stdout


def test_bad_argument_is_refused():
    res = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "usage" in res.stderr
    res = subprocess.run(["bash", str(SCRIPT), "--only", "build,nope"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--only takes step names from: environment build" in res.stderr


def _only_environment(tmp_path, python: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PINPOINT_GPU_CHECK_OUT": str(tmp_path), "PYTHON": python}
    return subprocess.run(["bash", str(SCRIPT), "--only", "environment"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)


def test_step_runner_records_and_summarises(tmp_path):
    """The real runner on one step that works without a GPU: a row in the steps file, the
    summary table and JSON, exit 0; with a python that fails, the step fails and so does the run."""
    res = _only_environment(tmp_path, sys.executable)
    assert res.returncode == 0, res.stdout + res.stderr
    name, cap, _, rc = (tmp_path / "gpu_check_steps.tsv").read_text().split("\t")
    assert (name, cap, rc.strip()) == ("environment", "10", "0")
    assert json.loads((tmp_path / "gpu_check.json").read_text())["ok"] is True
    assert "| environment | 10 |" in (tmp_path / "gpu_check.md").read_text()
    res = _only_environment(tmp_path, "false")
    assert res.returncode == 1
    assert (tmp_path / "gpu_check_steps.tsv").read_text().split("\t")[3].strip() != "0"


def test_summary_fails_on_a_failed_step_or_a_mismatch(tmp_path):
    common = _load("common")
    (tmp_path / "gpu_check_steps.tsv").write_text("build\t75\t40\t0\ntriton-tests\t70\t70\t124\n")
    assert common.gpu_check_summary(tmp_path, 0) == 1
    md = (tmp_path / "gpu_check.md").read_text()
    assert "HIT CAP" in md and "FAILED" in md
    (tmp_path / "gpu_check_steps.tsv").write_text("build\t75\t40\t0\n")
    (tmp_path / "e2e_7b.json").write_text(json.dumps({"checks": [{"check": "x", "ok": True, "detail": ""}]}))
    assert common.gpu_check_summary(tmp_path, 0) == 0
    assert json.loads((tmp_path / "gpu_check.json").read_text())["ok"] is True
    (tmp_path / "kernels_gpu.json").write_text(json.dumps({"checks": [{"check": "y", "ok": False, "detail": ""}]}))
    assert common.gpu_check_summary(tmp_path, 0) == 1
    assert "MISMATCH kernels_gpu.json: y" in (tmp_path / "gpu_check.md").read_text()


@pytest.fixture
def fresh_checks():
    backends.reset_self_checks()
    yield
    backends.reset_self_checks()


def test_kernels_gpu_cpu_mode_passes_and_fails_on_a_wrong_kernel(tmp_path, monkeypatch, fresh_checks):
    kg = _load("kernels_gpu")
    argv = ["--tiny", "--device", "cpu", "--iters", "1", "--warmup", "0", "--out", str(tmp_path)]
    assert kg.main(argv) == 0
    res = json.loads((tmp_path / "kernels_gpu.json").read_text())
    assert res["ok"] and len(res["checks"]) > 20
    assert {"fused_cpu", "launcher_cpu", "sdpa_one_call", "sdpa_loop_per_variant"} <= set(res["timings"]["tiny_mha"])
    monkeypatch.setenv("PINPOINT_SELF_CHECK", "0")  # let the broken kernel through to the benchmark
    real = cpu.head_slice_grad
    monkeypatch.setattr(cpu, "head_slice_grad", lambda *a, **k: real(*a, **k) * 1.01)
    assert kg.main(argv) == 1
    bad = [c["check"] for c in json.loads((tmp_path / "kernels_gpu.json").read_text())["checks"] if not c["ok"]]
    assert bad and all("head_slice_grad" in c or "head_slice_linear" in c for c in bad)


def test_kernels_gpu_exception_is_a_failure_not_a_skip(tmp_path, monkeypatch, fresh_checks):
    kg = _load("kernels_gpu")
    monkeypatch.setenv("PINPOINT_SELF_CHECK", "0")

    def boom(*a, **k):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(cpu, "head_patched_attention", boom)
    assert kg.main(["--tiny", "--device", "cpu", "--iters", "1", "--warmup", "0", "--out", str(tmp_path)]) == 1
    failed = [c for c in json.loads((tmp_path / "kernels_gpu.json").read_text())["checks"] if not c["ok"]]
    assert any("launch failed" in c["detail"] for c in failed)


E2E_ARGS = ["--tiny", "--pairs", "2", "--loop-heads", "2", "--steps", "3", "--new-tokens", "3"]


def test_e2e_tiny_runs_end_to_end(tmp_path):
    e2e = _load("e2e_7b")
    out = tmp_path / "e2e.json"
    assert e2e.main([*E2E_ARGS, "--dtype", "bfloat16", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ok"] and {c["check"].split("]")[0] for c in res["checks"] if c["check"].startswith("[")} == \
        {"[main", "[fp32"}
    assert len(res["checks"]) == 7 and all(c["ok"] for c in res["checks"])


def test_e2e_fails_when_one_score_is_corrupted(tmp_path, monkeypatch):
    e2e = _load("e2e_7b")
    real = e2e.pp.locate
    head = e2e.picked_heads(2, 4, 2, 0)[0]  # the tiny config: 2 layers x 4 heads, seed 0

    def corrupted(*args, **kwargs):
        scores = real(*args, **kwargs)
        scores.values[head] += 0.01
        return scores

    monkeypatch.setattr(e2e.pp, "locate", corrupted)
    out = tmp_path / "e2e.json"
    assert e2e.main([*E2E_ARGS, "--out", str(out)]) == 1
    failed = [c["check"] for c in json.loads(out.read_text())["checks"] if not c["ok"]]
    assert failed == ["[main] locate path == per-head loop"]


def test_bench_scripts_import_on_cpu():
    for name in ("kernels_gpu", "e2e_7b"):
        res = subprocess.run([sys.executable, "-c", f"import runpy; runpy.run_path('bench/{name}.py', run_name='x')"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_gpu_modes_exit_2_without_a_gpu(capsys):
    assert _load("kernels_gpu").main([]) == 2
    assert _load("e2e_7b").main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
