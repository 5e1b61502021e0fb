"""Shared by the benchmarks: timing, environment notes and writing results.

Each benchmark writes bench/out/<name>.json and replaces its own section of
bench/RESULTS.md (between `<!-- name:begin -->` and `<!-- name:end -->`), so sections
from different machines and runs sit side by side.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
RESULTS_MD = BENCH_DIR / "RESULTS.md"


def time_call(fn, *, repeat: int = 7, warmup: int = 2, min_time: float = 0.05) -> float:
    """Median seconds per call; each sample loops until it lasts at least `min_time`."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    samples = []
    for _ in range(repeat):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time:
                break
        samples.append(elapsed / n)
    return statistics.median(samples)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def run_meta() -> dict:
    """Where and when a measurement ran: the machine (with torch's thread count), torch, the date."""
    return {"machine": machine(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "ci": bool(os.environ.get("CI"))}


def write_results(name: str, title: str, rows: list[dict], columns: list[str], notes: str = "",
                  meta: dict | None = None) -> str:
    """Write JSON and the markdown section for one benchmark; returns the markdown. ``meta``:
    the measurement's :func:`run_meta` when the table is rewritten later (default: now)."""
    OUT_DIR.mkdir(exist_ok=True)
    meta = meta or run_meta()
    (OUT_DIR / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |\n" for r in rows)
    md = (f"<!-- {name}:begin -->\n### {title}\n\nMachine: {meta['machine']}; torch {meta['torch']}; "
          f"{meta['date']}.\n\n{head}{body}\n{notes.strip()}\n<!-- {name}:end -->\n")
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n\n"
    pattern = re.compile(rf"<!-- {re.escape(name)}:begin -->.*?<!-- {re.escape(name)}:end -->\n", re.S)
    text = pattern.sub(lambda _: md, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + md
    RESULTS_MD.write_text(text)
    return md


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def gpu_check_summary(out_dir: str | os.PathLike, status: int) -> int:
    """bench/gpu_check.sh's last step: one table of its steps (from gpu_check_steps.tsv:
    name, cap, seconds, exit code) with the benchmark and end-to-end verdicts folded in,
    written to gpu_check.md / gpu_check.json in `out_dir` and printed. Returns 0 only if
    every step passed and every cross-check recorded in those JSON files held."""
    out = Path(out_dir)
    rows = []
    tsv = out / "gpu_check_steps.tsv"
    for line in (tsv.read_text().splitlines() if tsv.exists() else []):
        name, cap, secs, rc = line.split("\t")
        verdict = "ok" if rc == "0" else ("HIT CAP" if rc == "124" else f"FAILED (exit {rc})")
        rows.append({"step": name, "cap_s": int(cap), "seconds": int(secs), "exit": int(rc), "result": verdict})
    checks = []
    for name in ("kernels_gpu.json", "e2e_7b.json"):
        path = out / name
        data = json.loads(path.read_text()) if path.exists() else {}
        for c in data.get("checks", []) if isinstance(data.get("checks"), list) else []:
            checks.append({"source": name, **c})
    ok = status == 0 and bool(rows) and all(r["exit"] == 0 for r in rows) and all(c["ok"] for c in checks)
    lines = ["| step | cap s | seconds | result |", "|---|---:|---:|---|"]
    lines += [f"| {r['step']} | {r['cap_s']} | {r['seconds']} | {r['result']} |" for r in rows]
    lines += ["", f"caps total {sum(r['cap_s'] for r in rows)} s, wall {sum(r['seconds'] for r in rows)} s; "
              f"{sum(c['ok'] for c in checks)}/{len(checks)} cross-checks held", ""]
    lines += [f"- {'ok' if c['ok'] else 'MISMATCH'} {c['source']}: {c['check']}: {c.get('detail', '')}"
              for c in checks]
    md = f"## gpu_check on {machine()}: {'PASSED' if ok else 'FAILED'}\n\n" + "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(md)
    (out / "gpu_check.json").write_text(json.dumps({"machine": machine(), "torch": torch.__version__, "ok": ok,
                                                    "steps": rows, "checks": checks}, indent=2) + "\n")
    print(md)
    return 0 if ok else 1
