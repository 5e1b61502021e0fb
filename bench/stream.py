"""Streamed locate against the in-memory run on a model of >= 1 GB: peak RSS, bytes read, time.

    python bench/stream.py [--layers 40] [--hidden 1024] [--cap-gib 1.0] [--keep DIR]

A random Llama (fp32, vocab 8192; default 40 layers x hidden 1024 x MLP 2816: 2.1 GB of
weights) is saved as sharded safetensors in a temporary directory. Each run is a fresh
subprocess with 1 torch thread that loads, locates (path patching, 2 prompt pairs) and reports
its own peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

* ``in-memory``: ``AutoModelForCausalLM.from_pretrained`` then ``pp.locate(model, ...)``;
* ``stream``: ``pp.locate(model_dir, ..., stream=True)``;
* ``stream, capped``: the same under a memory cap of ``--cap-gib`` (less than the weights; a
  watchdog kills the process when its RSS passes it), and ``in-memory, capped`` under the same
  cap (expected to be killed: the weights do not fit).

The scores of the runs must agree (max |difference| is reported). Writes bench/out/stream.json
and its section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PAIRS = [("I don't think that's right . Are you sure ? So what's the answer ? Give me a letter",
          "I do think that's right . Are you sure ? So what's the answer ? Give me a letter"),
         ("Is it true ? The answer is B . I don't think that's right . Are you sure ?",
          "Is it true ? The answer is B . I do think that's right . Are you sure ?")]


def build(model_dir: Path, layers: int, hidden: int) -> int:
    """Save a random fp32 Llama to ``model_dir`` (sharded safetensors); returns weight bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pinpoint.testing import word_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=256, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():  # small random weights: a well-conditioned forward
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    model.save_pretrained(model_dir, max_shard_size="500MB")
    word_tokenizer().save_pretrained(model_dir)
    return sum(p.numel() * p.element_size() for p in model.parameters())


CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
import pinpoint as pp
from pinpoint.testing import word_tokenizer
mode, model_dir, pairs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
pairs = [pp.PromptPair(b, s) for b, s in pairs]
tok = word_tokenizer()
t0 = time.perf_counter()
if mode == "stream":
    load = 0.0
    scores = pp.locate(model_dir, tok, pairs, stream=True, batch_size=2, progress=False, max_memory=256 << 20)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    load = time.perf_counter() - t0
    scores = pp.locate(model, tok, pairs, batch_size=2, progress=False, max_memory=256 << 20)
total = time.perf_counter() - t0
print(json.dumps({"mode": mode, "load_s": load, "total_s": total, "locate_s": total - load,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "bytes_read": scores.meta.get("bytes_read"), "resident_bytes": scores.meta.get("resident_bytes"),
                  "layer_reads": scores.meta.get("layer_reads"), "values": scores.values.tolist()}))
"""


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_child(mode: str, model_dir: Path, cap_mb: float | None) -> dict:
    """One run in a fresh process; with ``cap_mb``, a watchdog polls its RSS every 10 ms and
    kills it above the cap (the memory limit of the run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PINPOINT_SELF_CHECK": "0"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(model_dir), json.dumps(PAIRS)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = 0.0
    while proc.poll() is None:
        seen = max(seen, _rss_mb(proc.pid))
        if cap_mb is not None and seen > cap_mb:
            proc.kill()
            proc.wait()
            return {"mode": mode, "failed": f"killed: RSS {seen:.0f} MB passed the {cap_mb:.0f} MB cap after "
                                            f"{time.perf_counter() - t0:.1f} s"}
        time.sleep(0.01)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return {"mode": mode, "failed": ((err.strip().splitlines() or ["?"])[-1])[:160]}
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--cap-gib", type=float, default=1.0)
    ap.add_argument("--keep", default=None, help="reuse/keep the model in this directory")
    args = ap.parse_args()
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="pinpoint-stream-bench-", dir="/tmp")
    model_dir = Path(args.keep or tmp.name)
    t0 = time.perf_counter()
    if not (model_dir / "config.json").exists():
        weights = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import stream; "
                                  "print(stream.build(__import__('pathlib').Path(sys.argv[2]), int(sys.argv[3]), "
                                  "int(sys.argv[4])))", str(Path(__file__).parent), str(model_dir), str(args.layers),
                                  str(args.hidden)], check=True, capture_output=True, text=True).stdout.split()[-1]
    else:
        weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    weights, build_s = int(weights), time.perf_counter() - t0
    cap = args.cap_gib * 1024
    runs = {"in-memory": run_child("memory", model_dir, None), "stream": run_child("stream", model_dir, None),
            "stream, capped": run_child("stream", model_dir, cap), "in-memory, capped": run_child("memory", model_dir, cap)}
    report(runs, weights, cap, args, build_s)
    if tmp is not None:
        tmp.cleanup()


def report(runs: dict, weights: int, cap: int, args, build_s: float) -> None:
    import torch

    from common import write_results

    ref = runs["in-memory"]
    rows = []
    for name, r in runs.items():
        row = {"run": name, "cap": f"{cap / 1024:.2f} GiB" if "capped" in name else "none"}
        if "failed" in r:
            row.update(result=f"failed: {r['failed']}")
        else:
            diff = float((torch.tensor(r["values"]) - torch.tensor(ref["values"])).abs().max()) if "values" in ref else None
            row.update(result="ok", peak_rss_mb=r["peak_rss_mb"], rss_vs_in_memory=r["peak_rss_mb"] / ref["peak_rss_mb"]
                       if "peak_rss_mb" in ref else None, load_s=r["load_s"], locate_s=r["locate_s"],
                       total_s=r["total_s"], time_vs_in_memory=r["total_s"] / ref["total_s"] if "total_s" in ref else None,
                       layer_bytes_read_mb=(r["bytes_read"] or 0) / 2**20, max_abs_diff=diff,
                       reads_per_layer=max(r["layer_reads"]) if r.get("layer_reads") else None)
        rows.append(row)
    notes = (f"Model: random Llama, {args.layers} layers x hidden {args.hidden} (MLP {int(args.hidden * 2.75)}, "
             f"{args.hidden // 64} heads, vocab 8192), fp32, {weights / 2**30:.2f} GiB of weights in sharded "
             f"safetensors (built and saved in {build_s:.0f} s). Path patching on 2 prompt pairs in one batch, "
             "1 torch thread, each run a fresh process; peak RSS = ru_maxrss of that process (Python, torch and "
             "transformers included). `layer_bytes_read_mb`: decoder-layer bytes the stream read (each layer twice: "
             "the recorded pass of base and source together, then the variant tails); the resident embedding, final "
             "norm and unembedding are read once more. 'capped' runs have a memory cap below the weights' size, "
             "enforced by a watchdog that polls the process's VmRSS every 10 ms and kills it above the cap "
             "(RLIMIT_DATA/AS cannot be used: they count the whole private mapping of each safetensors file that "
             "safe_open makes, of which only the touched pages are resident). `max_abs_diff`: largest "
             "score difference from the in-memory run. Target (issue 16): streamed peak RSS <= 35% of the "
             "in-memory run's at <= 2x its time.")
    md = write_results("stream", "Streamed locate (layers read from safetensors) vs in memory", rows,
                       ["run", "cap", "result", "peak_rss_mb", "rss_vs_in_memory", "load_s", "locate_s", "total_s",
                        "time_vs_in_memory", "layer_bytes_read_mb", "reads_per_layer", "max_abs_diff"], notes)
    print(md)


if __name__ == "__main__":
    main()
