"""Build pinpoint's native kernels with ninja; metadata lives in pyproject.toml.

* ``pinpoint_kernels._C``: csrc/cpu/*.cpp, C++17 + OpenMP, always built.
* ``pinpoint_kernels._cuda``: csrc/cuda/*.cu + its bindings, built when nvcc is found
  (``PINPOINT_BUILD_CUDA=0`` skips it, ``=1`` makes a failure fatal). Links only the
  static CUDA runtime.

Neither links libtorch: they take raw pointers, so the build needs no torch and the
result works with any torch >= 2.4.

Environment: PINPOINT_CUDA_ARCHS (default "80;90"), PINPOINT_NATIVE_ARCH=0 to build the
CPU code without -march=native, MAX_JOBS for ninja's parallelism.
"""
from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_nvcc() -> str | None:
    if os.environ.get("PINPOINT_BUILD_CUDA", "") == "0":
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_lib_dir(nvcc: str) -> str | None:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             str(Path(os.path.realpath(nvcc)).parent.parent), "/usr/local/cuda"]
    try:  # nvcc is often a wrapper script: ask it where it really lives
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True).stderr
        homes += [line.split("=", 1)[1].strip() for line in out.splitlines() if "TOP=" in line]
    except OSError:
        pass
    for home in filter(None, homes):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if (Path(home) / sub / "libcudart_static.a").exists():
                return str(Path(home) / sub)
    return None


class NinjaExtension(Extension):
    def __init__(self, name: str, sources: list[str], kind: str):
        super().__init__(name, sources=sources)
        self.kind = kind  # "cpu" or "cuda"


class NinjaBuildExt(build_ext):
    """Writes one build.ninja per extension so sources compile in parallel."""

    def build_extension(self, ext: NinjaExtension) -> None:
        if ext.kind == "cuda":
            try:
                self._build(ext)
            except Exception as exc:  # CUDA is optional unless asked for explicitly
                if os.environ.get("PINPOINT_BUILD_CUDA") == "1":
                    raise
                print(f"pinpoint: CUDA extension not built ({exc}); CUDA backend disabled",
                      file=sys.stderr)
            return
        self._build(ext)

    def _build(self, ext: NinjaExtension) -> None:
        import pybind11

        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.build_temp).resolve() / ext.name.replace(".", "_")
        tmp.mkdir(parents=True, exist_ok=True)

        includes = [pybind11.get_include(), sysconfig.get_paths()["include"], str(ROOT / "csrc")]
        inc = " ".join(f"-I{shlex.quote(p)}" for p in includes)
        cxx = os.environ.get("CXX", "c++")
        cflags = f"-O3 -std=c++17 -fPIC -fvisibility=hidden -Wall {inc}"
        if ext.kind == "cpu":
            cflags += " -fopenmp"
            if os.environ.get("PINPOINT_NATIVE_ARCH", "1") != "0":
                cflags += " -march=native"
            ldflags = "-shared -fopenmp"
        else:
            nvcc = _find_nvcc()
            lib = _cuda_lib_dir(nvcc) if nvcc else None
            if not nvcc or not lib:
                raise RuntimeError("nvcc or libcudart_static.a not found")
            archs = os.environ.get("PINPOINT_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
            gencode = " ".join(f"-gencode arch=compute_{a},code=sm_{a}" for a in archs if a)
            last = [a for a in archs if a][-1]
            gencode += f" -gencode arch=compute_{last},code=compute_{last}"  # PTX for newer cards
            nvflags = (f"-O3 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fPIC,-fvisibility=hidden "
                       f"{gencode} {inc}")
            ldflags = f"-shared -L{shlex.quote(lib)} -lcudart_static -ldl -lrt -lpthread"

        lines = [
            "ninja_required_version = 1.3",
            f"rule cxx\n  command = {cxx} {cflags} -MMD -MF $out.d -c $in -o $out\n  depfile = $out.d\n  deps = gcc",
            f"rule link\n  command = {cxx} $in -o $out {ldflags}",
        ]
        if ext.kind == "cuda":
            lines.append(f"rule nvcc\n  command = {shlex.quote(nvcc)} {nvflags} -MD -MF $out.d -c $in -o $out"
                         "\n  depfile = $out.d\n  deps = gcc")
        objects = []
        for src in ext.sources:
            src_path = (ROOT / src).resolve()
            obj = tmp / (src_path.name + ".o")
            rule = "nvcc" if src_path.suffix == ".cu" else "cxx"
            lines.append(f"build {obj}: {rule} {src_path}")
            objects.append(str(obj))
        lines.append(f"build {out_path}: link {' '.join(objects)}")
        (tmp / "build.ninja").write_text("\n".join(lines) + "\n")

        ninja = shutil.which("ninja")
        if ninja is None:
            import ninja as ninja_pkg  # the PyPI wheel, a build requirement

            ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
        cmd = [ninja, "-C", str(tmp)]
        if os.environ.get("MAX_JOBS"):
            cmd += ["-j", os.environ["MAX_JOBS"]]
        subprocess.run(cmd, check=True)


def _extensions() -> list[NinjaExtension]:
    exts = [NinjaExtension("pinpoint_kernels._C", sorted(glob.glob("csrc/cpu/*.cpp")), "cpu")]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    if _find_nvcc() and glob.glob("csrc/cuda/*.cu"):
        exts.append(NinjaExtension("pinpoint_kernels._cuda", cuda_sources, "cuda"))
    return exts


setup(ext_modules=_extensions(), cmdclass={"build_ext": NinjaBuildExt})
