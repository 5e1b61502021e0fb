"""Pieces every command shares: flag types, the model/data/heads loaders with CLI-worded
errors, and ``--threads``.

Everything here raises :class:`pinpoint.errors.UserError` for a user's mistake, naming the
flag to fix. Library errors are converted only where they are known to come from the user's
input (a call on a user-given file, a documented exception type), never wholesale.
"""
from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

from ..errors import UserError

THREADS_HELP = ("CPU threads for torch (default: torch's, one per core). On a shared machine pass 1 or 2: "
                "with another job running, the default can be many times slower")


# --- flag types: argparse reports their errors as one usage line, exit 2 --------------------

def _integer(text: str, minimum: int) -> int:
    need = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}") from None
    if v < minimum:
        raise argparse.ArgumentTypeError(f"must be {need}, got {v}")
    return v


def positive_int(text: str) -> int:
    return _integer(text, 1)


def nonnegative_int(text: str) -> int:
    return _integer(text, 0)


def _number(text: str, *, zero_ok: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
        raise argparse.ArgumentTypeError(f"must be a {'number >= 0' if zero_ok else 'positive number'}, got {text}")
    return v


def positive_float(text: str) -> float:
    return _number(text, zero_ok=False)


def nonnegative_float(text: str) -> float:
    return _number(text, zero_ok=True)


def unit_fraction(text: str) -> float:
    """A number in [0, 1]."""
    v = _number(text, zero_ok=True)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return v


def parts_letters(text: str) -> str:
    """A non-empty subset of "qkvo", each letter once."""
    bad = sorted(set(text) - set("qkvo"))
    if not text or bad or len(set(text)) != len(text):
        why = "is empty" if not text else (f"has {', '.join(map(repr, bad))}" if bad else "repeats a letter")
        raise argparse.ArgumentTypeError(f"{text!r} {why}; use letters of q, k, v, o, each once (e.g. qkvo, qo)")
    return text


# --- threads --------------------------------------------------------------------------------

def set_threads(n: int | None) -> None:
    """``--threads N``: torch's intra-op threads for this process (None: leave torch's default)."""
    if n is not None:
        import torch

        torch.set_num_threads(n)


# --- model loading --------------------------------------------------------------------------

def parse_dtype(name: str):
    """--dtype NAME -> a torch dtype, or None for "auto"."""
    import torch

    table = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise UserError(f"--dtype {name!r}: use one of auto, float32, bfloat16, float16")
    return table[name]


def disk_dtype(model_dir: Path):
    """The dtype a checkpoint was saved in, from config.json (``dtype``, or ``torch_dtype`` as
    older transformers write it); float32 when it names none (transformers' own default)."""
    import torch

    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = cfg.get("dtype") or cfg.get("torch_dtype") if isinstance(cfg, dict) else None
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


def parse_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (try cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is visible")
    return dev


def check_model_dir(path: str, flag: str = "--model") -> Path:
    """A local HF model directory, or a one-line error saying what it is instead."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag} {path}: no such directory (pass a local HF model directory)")
    if not p.is_dir():
        raise UserError(f"{flag} {path} is a file; pass the model's directory (the one save_pretrained wrote)")
    if not (p / "config.json").exists():
        raise UserError(f"{flag} {path}: no config.json there; is it a save_pretrained() directory?")
    return p


def _dtype_kwarg() -> str:
    """transformers >= 4.56 takes ``dtype=``; older releases only ``torch_dtype=``."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def load_model(path: str, *, device: str = "auto", dtype: str = "auto", chat_template: str | None = None,
               flag: str = "--model", need_template: bool = True, device_map: str | None = None,
               max_memory: str | None = None, offload_dir: str | None = None):
    """(model, tokenizer) from a local HF directory, checked for pinpoint support.

    ``dtype="auto"`` loads the dtype saved in config.json, passed explicitly so every
    transformers version means the same. The tokenizer must have a chat template, or
    ``chat_template`` (a Jinja file, or a JSON file with a "chat_template" key) supplies one
    (``need_template=False``: a model only scored on plain text, e.g. ``--kl-against``).
    ``device_map``/``max_memory``/``offload_dir`` (``--device-map``, ``--max-memory``,
    ``--offload-dir``): spread the model over devices with accelerate instead of ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import UnsupportedArchitectureError, spec_for
    from ..placement import check_materialised

    p = check_model_dir(path, flag)
    dt = parse_dtype(dtype) or disk_dtype(p)
    dev = parse_device(device)
    placed = _placement(device, device_map, max_memory, offload_dir)
    template = read_chat_template(chat_template) if chat_template is not None else None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, **{_dtype_kwarg(): dt}, **placed)
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:  # transformers' refusals of the files the user pointed at
        raise UserError(f"{flag} {path}: cannot load it: {str(exc).strip().splitlines()[0]}") from None
    try:
        check_materialised(spec_for(model))
    except (UnsupportedArchitectureError, ValueError) as exc:
        raise UserError(f"{flag} {path}: {exc}") from None
    _set_template(tokenizer, template, need_template, flag, path)
    (model if placed else model.to(dev)).eval()  # a device_map placed it already (accelerate's hooks)
    return model, tokenizer


def _set_template(tokenizer, template, need_template: bool, flag: str, path: str) -> None:
    if template is not None:
        tokenizer.chat_template = template
    elif need_template and getattr(tokenizer, "chat_template", None) is None:
        raise UserError(f"{flag} {path}: its tokenizer has no chat template; pass --chat-template FILE (a Jinja "
                        "chat template, or a tokenizer_config.json that has one)")


def load_streamed(path: str, *, dtype: str = "auto", chat_template: str | None = None):
    """(LayerStream, tokenizer) for ``locate --stream``: only the embeddings, final norm and
    unembedding are loaded; decoder layers are read from the safetensors files as used."""
    from transformers import AutoTokenizer

    from ..models import UnsupportedArchitectureError
    from ..stream import LayerStream

    p = check_model_dir(path)
    template = read_chat_template(chat_template) if chat_template is not None else None
    try:
        stream = LayerStream(p, dtype=parse_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError, UnsupportedArchitectureError) as exc:
        raise UserError(f"--model {path}: {str(exc).strip().splitlines()[0]}") from None
    _set_template(tokenizer, template, True, "--model", path)
    return stream, tokenizer


def _placement(device: str, device_map, max_memory, offload_dir) -> dict:
    """from_pretrained keywords of --device-map/--max-memory/--offload-dir (UserError when bad)."""
    from ..placement import device_map_kwargs

    if device_map is not None and device != "auto":
        raise UserError(f"--device {device} and --device-map {device_map}: give one of them")
    if device_map is not None and offload_dir is None:
        import atexit
        import shutil
        import tempfile

        offload_dir = tempfile.mkdtemp(prefix="pinpoint-offload-")  # weights accelerate puts on disk
        atexit.register(shutil.rmtree, offload_dir, True)
    try:
        return device_map_kwargs(device_map, max_memory, offload_dir)
    except ValueError as exc:
        flag = "--max-memory" if "max_memory" in str(exc) else "--device-map"
        raise UserError(f"{flag}: {exc}") from None


def placement(args) -> dict:
    """load_model keywords of a command's --device/--device-map/--max-memory/--offload-dir."""
    return {"device": args.device, "device_map": getattr(args, "device_map", None),
            "max_memory": getattr(args, "max_memory", None), "offload_dir": getattr(args, "offload_dir", None)}


def read_chat_template(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--chat-template {path}: no such file" + (" (it is a directory)" if p.is_dir() else ""))
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            text = json.loads(text).get("chat_template")
        except (ValueError, AttributeError):
            text = None
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"--chat-template {path}: a JSON file must have a non-empty \"chat_template\" string")
    if "{%" not in text and "{{" not in text:
        raise UserError(f"--chat-template {path}: not a Jinja chat template (no {{% or {{{{ in it)")
    return text


# --- data and heads -------------------------------------------------------------------------

def check_file(path: str | None, flag: str, what: str = "file") -> None:
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag} {path}: no such {what}")
    if p.is_dir():
        raise UserError(f"{flag} {path} is a directory; pass the {what} itself")


def load_rows(path: str, *, limit: int | None):
    """SycophancyEval-format rows of ``--data``; malformed lines are skipped and counted."""
    from ..data import load_are_you_sure

    check_file(path, "--data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rows = load_are_you_sure(path, on_error="skip", warn=False, limit=limit)
        except ValueError as exc:  # the loader's documented "no usable rows" for this file
            raise UserError(f"--data {path}: {str(exc).split(': ', 1)[-1]}; it must hold SycophancyEval "
                            "are_you_sure.jsonl-format rows, one JSON object per line") from None
    if rows.skipped:
        import sys

        print(f"pinpoint: skipped {rows.skipped} malformed line(s) of {path}; first: {rows.problems[0]}",
              file=sys.stderr)
    return rows


def check_k(k: int | None, n_layers: int, n_heads: int) -> None:
    n = n_layers * n_heads
    if k is not None and not 1 <= k <= n:
        raise UserError(f"--k {k}: must be between 1 and {n} (the model has {n_layers} layers x {n_heads} heads)")


def load_heads(path: str | None, k: int | None, model):
    """``--heads`` (a saved HeadScores directory or a HeadSet JSON file), top ``--k`` of it,
    validated against ``model``'s geometry."""
    from ..heads import HeadSet, as_head_list
    from ..models import spec_for

    if path is None:
        raise UserError("--heads is required: a saved HeadScores directory or a HeadSet JSON file")
    spec = spec_for(model)
    check_k(k, spec.n_layers, spec.n_heads)
    p = Path(path)
    if not p.exists():
        raise UserError(f"--heads {path}: no such file or directory")
    try:
        if k is None and p.is_dir():  # a scores directory without --k: k by the recipe rule
            k = _recipe_k(p)
        heads = HeadSet.load(p, k=k)
        as_head_list(heads, n_layers=spec.n_layers, n_heads=spec.n_heads, where="heads")
    except (OSError, ValueError, TypeError, KeyError) as exc:  # parsing the user's heads file
        raise UserError(f"--heads {path}: {str(exc).strip().splitlines()[0]}") from None
    if k is not None and len(heads) < k:
        raise UserError(f"--k {k}: --heads {path} lists only {len(heads)} heads")
    return heads


def _recipe_k(scores_dir: Path) -> int:
    """k for a saved HeadScores directory, printed: the one ``pinpoint locate`` chose by the
    recipe rule checked by ablation (recorded in the scores' meta, ``recipe_k``), else
    :func:`pinpoint.recipe.choose_k` on the scores alone."""
    from ..heads import HeadScores
    from ..recipe import choose_k

    scores = HeadScores.load(scores_dir)
    recorded = scores.meta.get("recipe_k")
    if isinstance(recorded, dict) and isinstance(recorded.get("k"), int) and recorded["k"] >= 1:
        k = recorded["k"]
        print(f"k = {k} (the recipe rule, as locate chose it: {recorded.get('rule')}; --k to choose)")
        return k
    k = choose_k(scores)
    print(f"k = {k} (the recipe rule: the heads above the largest drop in score, and every head within 25% "
          "of the top; --k to choose)")
    return k


def directory_kind(path: Path) -> str:
    """What a directory given as ``--adapter`` holds: "pinpoint" (a pinpoint adapter), "peft"
    (a PEFT adapter, e.g. from ``export --peft``), "model" (a saved transformers model, e.g.
    ``tune --full``'s ``model/``) or "none"."""
    from ..adapter_io import CONFIG_NAME, LEGACY_CONFIG_NAME

    if (path / CONFIG_NAME).is_file():
        return "pinpoint"
    if (path / LEGACY_CONFIG_NAME).is_file():  # PEFT's file name, which pinpoint's config once had
        try:
            peft = "peft_type" in json.loads((path / LEGACY_CONFIG_NAME).read_text())
        except (OSError, ValueError):
            peft = False
        return "peft" if peft else "pinpoint"
    return "model" if (path / "config.json").is_file() else "none"


def load_adapter(model, path: str, *, check_fingerprint: bool = True):
    """``--adapter DIR`` attached to ``model`` (a :class:`PinpointAdapter`, not merged)."""
    from ..adapter import PinpointAdapter
    from ..adapter_io import CONFIG_NAME, AdapterMismatchError

    p = Path(path)
    if not p.exists():
        raise UserError(f"--adapter {path}: no such directory")
    if not p.is_dir():
        raise UserError(f"--adapter {path} is a file; pass the adapter directory (tune's --out/adapter)")
    kind = directory_kind(p)
    if kind == "peft":
        raise UserError(f"--adapter {path} holds a PEFT adapter, not a pinpoint one; pass tune's --out/adapter (load "
                        "a PEFT adapter with peft.PeftModel.from_pretrained)")
    if kind != "pinpoint":
        hint = next((f"; did you mean --adapter {p / sub}?" for sub in ("adapter", "model")
                     if (p / sub).is_dir() and directory_kind(p / sub) in ("pinpoint", "model")), "")
        raise UserError(f"--adapter {path}: no pinpoint adapter there ({CONFIG_NAME} is missing){hint}")
    try:
        return PinpointAdapter.load(p, model, check_fingerprint=check_fingerprint)
    except AdapterMismatchError as exc:
        msg = str(exc).replace("pass check_fingerprint=False", "pass --no-fingerprint-check")
        raise UserError(f"--adapter {path}: {msg}") from None


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help=THREADS_HELP)
