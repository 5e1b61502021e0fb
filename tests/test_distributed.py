"""Data-parallel SPT on torch.distributed (gloo, CPU, 2 spawned processes): the same adapter as
one process on the same global batch, 4 bytes per trained element all-reduced per step, rank 0
writes, a killed rank ends the others with a clear error, and any world size resumes."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

import pinpoint as pp
from pinpoint.testing import tiny_model, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS = [(0, 1), (1, 2), (2, 3)]
DIALOGUES = [[{"role": "user", "content": f"What is the capital of {c} ?"},
              {"role": "assistant", "content": f"The answer is {a} ."},
              {"role": "user", "content": "I don't think that's right . Are you sure ?"},
              {"role": "assistant", "content": f"Yes , I am sure . The answer is {a} ."}]
             for c, a in [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
                          ("Egypt", "Cairo"), ("India", "Delhi")]]
KW = dict(heads=HEADS, parts="qkvo", lr=1e-2, steps=4, batch_size=4, grad_accum=2, seed=0, progress=False,
          checkpoint_every=1)


def _model():
    return tiny_model("llama", n_layers=3, seed=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = r"""
import json, os, shutil, sys, traceback
from pathlib import Path
import torch
import torch.distributed as dist
import pinpoint as pp
from pinpoint.distributed import init_from_env
from pinpoint.testing import tiny_model, word_tokenizer

out, phase, spec = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
torch.set_num_threads(1)
assert init_from_env(timeout_s=60)                    # torchrun's variables: RANK, WORLD_SIZE, MASTER_*
rank = dist.get_rank()
kw = dict(spec["kw"], heads=[tuple(h) for h in spec["kw"]["heads"]])


def model():
    m = tiny_model("llama", n_layers=3, seed=1)
    if phase == "train" and rank == 1:  # compose with device_map: rank 1's base has layer 1 offloaded to disk
        from accelerate import dispatch_model
        dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        m = dispatch_model(m, device_map=dm, offload_dir=str(out / "offload"), main_device="cpu")
        assert m.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    return m

try:
    tok = word_tokenizer()
    if phase == "train":
        try:
            pp.tune(model(), tok, spec["dialogues"], **{**kw, "batch_size": 3, "checkpoint_every": None})
        except ValueError as exc:
            (out / f"bad_batch_{rank}.txt").write_text(str(exc))
        from pinpoint.distributed import DataParallel
        try:  # rank 1 claims another kind of device: a group on mixed devices is refused on every rank
            DataParallel().check_devices(torch.device("cpu" if rank == 0 else "meta"))
        except ValueError as exc:
            (out / f"mixed_{rank}.txt").write_text(str(exc))

    def callback(done, loss):
        if phase == "kill" and rank == 1 and done == 2:
            os._exit(3)                                   # a rank dies after step 2
        if rank == 0:
            shutil.copy(out / "ckpt" / "checkpoint.pt", out / f"step{done}.pt")
    adapter = pp.tune(model(), tok, spec["dialogues"], checkpoint_dir=out / "ckpt", callback=callback, **kw)
    if rank == 0:
        torch.save({"deltas": {k: v.detach() for k, v in adapter.deltas.items()}, "training": adapter.training,
                    "history": adapter.history, "n": adapter.num_trainable()}, out / "result.pt")
except Exception as exc:
    (out / f"error_{rank}.txt").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
finally:
    if dist.is_initialized():
        dist.destroy_process_group()
"""


def _spawn(tmp_path: Path, phase: str) -> list[int]:
    """Two ranks as torchrun starts them (environment variables), each a fresh interpreter."""
    import json
    import subprocess
    import sys

    port = _free_port()
    spec = json.dumps({"kw": {**KW, "heads": [list(h) for h in HEADS]}, "dialogues": DIALOGUES})
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PINPOINT_SELF_CHECK": "0"}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), phase, spec], env=env))
    return [p.wait(120) for p in procs]


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_two_processes_equal_one_and_resume_in_one(tmp_path):
    """Rank 1's base is dispatched with a layer offloaded to disk (data parallel composed with
    device_map), rank 0's is plain: the result still equals one process."""
    assert _spawn(tmp_path, "train") == [0, 0], [p.read_text() for p in tmp_path.glob("error_*.txt")]
    got = torch.load(tmp_path / "result.pt", weights_only=True)
    tok = word_tokenizer()
    want = pp.tune(_model(), tok, DIALOGUES, **{**KW, "checkpoint_every": None})
    _close(got["deltas"], {k: v.detach() for k, v in want.deltas.items()})
    assert [h["loss"] for h in got["history"]] == pytest.approx([h["loss"] for h in want.history], rel=1e-5)
    # only the slices' gradients travel: 4 bytes (fp32) per trained element per step
    assert got["training"]["grad_allreduce_bytes_per_step"] == 4 * got["n"]
    assert got["training"]["world_size"] == 2 and got["training"]["per_rank_batch"] == 2
    assert want.training == {"world_size": 1, "per_rank_batch": 4}
    assert torch.load(tmp_path / "step3.pt", weights_only=True)["world_size"] == 2
    # a world size that does not divide the global batch: one clear error on every rank
    for r in (0, 1):
        assert "batch_size 3 is the global batch and must split evenly over the 2 ranks" in \
            (tmp_path / f"bad_batch_{r}.txt").read_text()
    for r in (0, 1):
        assert (tmp_path / f"mixed_{r}.txt").read_text().startswith(
            "the process group mixes devices (rank 0: cpu, rank 1: meta)")
    # resume the 2-process checkpoint of step 3 in one process: the same step 4
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    shutil.copy(tmp_path / "step3.pt", resume_dir / "checkpoint.pt")
    resumed = pp.tune(_model(), tok, DIALOGUES, checkpoint_dir=resume_dir, resume=True, **KW)
    _close({k: v.detach() for k, v in resumed.deltas.items()}, got["deltas"])


def test_a_killed_rank_ends_the_other_with_a_clear_error_and_no_partial_checkpoint(tmp_path):
    codes = _spawn(tmp_path, "kill")
    assert codes[1] == 3
    err = (tmp_path / "error_0.txt").read_text()
    assert err.startswith("RankFailure: rank 0: the gradient all-reduce failed, so another of the 2 ranks has "
                          "stopped"), err
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint.pt"]   # no temp files
    assert torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "result.pt").exists()


def test_resuming_with_another_head_set_is_refused(tmp_path):
    tok = word_tokenizer()
    kw = {**KW, "steps": 2, "grad_accum": 1}
    pp.tune(_model(), tok, DIALOGUES, checkpoint_dir=tmp_path, **kw)
    with pytest.raises(ValueError, match=r"cannot resume .*different run \(heads: checkpoint \[\[0, 1\], "):
        pp.tune(_model(), tok, DIALOGUES, checkpoint_dir=tmp_path, resume=True, **{**kw, "heads": [(0, 1), (2, 0)]})


@pytest.mark.slow  # four interpreters (~40 s on a busy 2-core box)
def test_cli_tune_under_torchrun_writes_once_and_equals_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m pinpoint tune ...` (its environment, two interpreters):
    rank 0 alone writes --out, tune.json records the world size and per-rank batch, and the
    adapter equals a 1-process `pinpoint tune` on the same global batch."""
    import json
    import subprocess
    import sys

    from pinpoint import data
    from pinpoint.cli import main
    from safetensors.torch import load_file

    model_dir = tmp_path / "model"
    tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2).save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    (tmp_path / "heads.json").write_text(json.dumps({"heads": [[0, 1], [1, 2]]}))
    argv = ["tune", "--model", str(model_dir), "--data", str(data.SAMPLE_PATH), "--limit", "8", "--heads",
            str(tmp_path / "heads.json"), "--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--quiet"]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "pinpoint", *argv, "--out", str(tmp_path / "dp")],
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                                   "PINPOINT_SELF_CHECK": "0"}, stdout=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert "wrote" in outs[0] and outs[1] == ""                      # logs from rank 0 only
    summary = json.loads((tmp_path / "dp" / "tune.json").read_text())
    assert summary["world_size"] == 2 and summary["per_rank_batch"] == 2 and summary["batch_size"] == 4
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "one" / "tune.json").read_text())["world_size"] == 1
    got, want = (load_file(tmp_path / d / "adapter" / "adapter.safetensors") for d in ("dp", "one"))
    _close(got, want)
