"""Build csrc/cuda as plain C++ against the warp emulator (pp_emu.h) and load it.

The result is a drop-in stand-in for ``pinpoint_kernels._cuda`` that takes *host* pointers:
``pinpoint_kernels.cuda`` launchers run unchanged on CPU tensors once ``emulated_cuda()``
has patched the module accessor and the stream/device helpers. It lets the CUDA kernels'
index math, masking, zero-fill and synchronisation be checked on a machine with no GPU.

    python tests/gpu/emulator/build.py [--sanitize thread|address]   # just build
    python tests/gpu/emulator/build.py --race-check     # ThreadSanitizer run, no Python
    python tests/gpu/emulator/build.py --bounds-check   # AddressSanitizer run, no Python

Sanitized builds must run with the sanitizer runtime preloaded, e.g.
``LD_PRELOAD=$(g++ -print-file-name=libtsan.so) python ...``.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
CSRC = ROOT / "csrc"


def _sources() -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(CSRC / "cuda" / "*.cu"))) + \
        sorted(Path(p) for p in glob.glob(str(CSRC / "cuda" / "*.cpp")))


def _digest(flags: list[str]) -> str:
    h = hashlib.sha256(" ".join(flags).encode())
    for p in sorted(glob.glob(str(CSRC / "cuda" / "*"))) + [str(HERE / "pp_emu.h"), str(CSRC / "cpu" / "dtypes.h")]:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def pybind11_include() -> str | None:
    """pybind11's headers: the pybind11 package, else the copy torch ships (header-only, so
    the emulated module still does not link libtorch); None if neither is present."""
    try:
        import pybind11

        return pybind11.get_include()
    except ImportError:
        pass
    spec = importlib.util.find_spec("torch")
    if spec and spec.origin:
        inc = Path(spec.origin).parent / "include"
        if (inc / "pybind11" / "pybind11.h").exists():
            return str(inc)
    return None


def missing_tools() -> str | None:
    """Why the emulator cannot be built here (for a skip reason), or None."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return f"the C++ compiler {cxx!r} is not on PATH"
    if pybind11_include() is None:
        return "pybind11 headers not found (pip install pybind11)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "Python.h not found (install the Python development headers)"
    return None


def build(sanitize: str | None = None, out_dir: str | os.PathLike | None = None, jobs: int = 2) -> Path:
    """Compile (cached by source hash) and return the path of the emulated _cuda module."""
    why = missing_tools()
    if why:
        raise RuntimeError(f"cannot build the CUDA emulator: {why}")
    cxx = os.environ.get("CXX", "g++")
    flags = ["-std=c++17", "-O1", "-g", "-fPIC", "-fvisibility=hidden", "-pthread",
             "-DPINPOINT_CUDA_EMULATE", f"-I{HERE}", f"-I{CSRC}", f"-I{CSRC / 'cuda'}",
             f"-I{pybind11_include()}", f"-I{sysconfig.get_paths()['include']}"]
    if sanitize:
        flags.append(f"-fsanitize={sanitize}")
    out = Path(out_dir or (ROOT / "build" / "emulator")) / f"{sanitize or 'plain'}-{_digest(flags)}"
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    target = out / f"_cuda{suffix}"
    if target.exists():
        return target
    out.mkdir(parents=True, exist_ok=True)

    def compile_one(src: Path) -> Path:
        obj = out / (src.name + ".o")
        lang = ["-x", "c++"] if src.suffix == ".cu" else []
        subprocess.run([cxx, *flags, *lang, "-c", str(src), "-o", str(obj)], check=True)
        return obj

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        objects = list(pool.map(compile_one, _sources()))
    subprocess.run([cxx, "-shared", "-pthread", *([f"-fsanitize={sanitize}"] if sanitize else []),
                    *map(str, objects), "-o", str(target)], check=True)
    return target


def load(path: Path):
    spec = importlib.util.spec_from_file_location("_cuda", str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def emulated_cuda(sanitize: str | None = None):
    """Run ``backend="cuda"`` on CPU tensors through the emulated module.

    Patches ``pinpoint_kernels.cuda`` (module accessor, stream and device helpers) and lets
    ``pinpoint_kernels.backends`` accept the cuda backend for CPU tensors, so calls go
    through the public ops' validation and normalisation exactly as on a GPU.
    """
    from pinpoint_kernels import backends
    from pinpoint_kernels import cuda as launchers

    mod = load(build(sanitize))
    saved = (launchers._cuda, launchers._stream, launchers._device_index, backends._usable)
    usable = backends._usable
    launchers._cuda = lambda: mod
    launchers._stream = lambda device: 0
    launchers._device_index = lambda device: -1
    backends._usable = lambda name, device: None if name == "cuda" else usable(name, device)
    try:
        yield launchers
    finally:
        launchers._cuda, launchers._stream, launchers._device_index, backends._usable = saved


def race_check(sanitizer: str = "thread", jobs: int = 2) -> int:
    """Build race_check.cpp + the kernels with -fsanitize=<sanitizer> and run it (OS threads,
    both cp.async modes). thread: shared-memory races; address: out-of-bounds accesses
    (inputs are exact-size host arrays). Returns the worst exit status; reports go to stderr."""
    cxx = os.environ.get("CXX", "g++")
    flags = ["-std=c++17", "-O1", "-g", "-pthread", f"-fsanitize={sanitizer}", "-DPINPOINT_CUDA_EMULATE",
             f"-I{HERE}", f"-I{CSRC}", f"-I{CSRC / 'cuda'}"]
    out = ROOT / "build" / "emulator" / f"race-{sanitizer}-{_digest(flags)}"
    exe = out / "race_check"
    if not exe.exists():
        out.mkdir(parents=True, exist_ok=True)
        srcs = [p for p in _sources() if p.suffix == ".cu"] + [HERE / "race_check.cpp"]

        def compile_one(src: Path) -> Path:
            obj = out / (src.name + ".o")
            lang = ["-x", "c++"] if src.suffix == ".cu" else []
            subprocess.run([cxx, *flags, *lang, "-c", str(src), "-o", str(obj)], check=True)
            return obj

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            objects = list(pool.map(compile_one, srcs))
        subprocess.run([cxx, "-pthread", f"-fsanitize={sanitizer}", *map(str, objects), "-o", str(exe)],
                       check=True)
    worst = 0
    for mode in ("eager", "lazy"):
        env = dict(os.environ, PP_EMU_THREADS="os", PP_EMU_CPASYNC=mode,
                   TSAN_OPTIONS=os.environ.get("TSAN_OPTIONS", "halt_on_error=1 exitcode=66"),
                   ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", "detect_leaks=0"))
        print(f"{sanitizer} sanitizer check, cp.async {mode}:", flush=True)
        worst = max(worst, subprocess.run([str(exe)], env=env).returncode)
    return worst


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sanitize", choices=["thread", "address"])
    ap.add_argument("--race-check", action="store_true", help="ThreadSanitizer run of race_check.cpp")
    ap.add_argument("--bounds-check", action="store_true", help="AddressSanitizer run of race_check.cpp")
    args = ap.parse_args()
    if args.race_check or args.bounds_check:
        sys.exit(max(race_check("thread") if args.race_check else 0,
                     race_check("address") if args.bounds_check else 0))
    print(build(args.sanitize))
    sys.exit(0)
