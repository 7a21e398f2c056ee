"""Builds retention._core from the header-only C++ library in ../include (see pyproject.toml).

Environment: EIGEN3_INCLUDE_DIR (default: /usr/include/eigen3 or /usr/local/include/eigen3),
RETENTION_NATIVE=0 to build without -march=native (a portable wheel), RETENTION_JOBS (default 2)
parallel compile jobs.
"""

import os
import pathlib

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

HERE = pathlib.Path(__file__).resolve().parent
INCLUDE = HERE.parent / "include"
if not (INCLUDE / "retention" / "core.hpp").exists():
    raise RuntimeError(f"retention headers not found in {INCLUDE}: build from a checkout of the "
                       "repository (pip install --no-build-isolation ./python)")


def eigen_dir():
    for d in (os.environ.get("EIGEN3_INCLUDE_DIR"), "/usr/include/eigen3",
              "/usr/local/include/eigen3"):
        if d and (pathlib.Path(d) / "Eigen" / "Core").exists():
            return d
    raise RuntimeError("Eigen 3.4 not found: apt-get install libeigen3-dev or set "
                       "EIGEN3_INCLUDE_DIR")


ParallelCompile("RETENTION_JOBS", default=2).install()
# Eigen as a system include: its own warnings are not ours.
flags = ["-O3", "-fopenmp", "-isystem", eigen_dir()]
if os.environ.get("RETENTION_NATIVE", "1") != "0":
    # GCC < 13 warns inside its own AVX intrinsics headers when Eigen vectorises with them (GCC
    # bug 105593); the CMake build silences the same.
    flags += ["-march=native", "-Wno-maybe-uninitialized", "-Wno-uninitialized"]

ext = Pybind11Extension(
    "retention._core",
    sources=[f"src/{name}.cpp" for name in ("module", "retention", "masa", "layers")],
    include_dirs=[str(INCLUDE)],
    define_macros=[("RETENTION_USE_OPENMP", "1")],
    extra_compile_args=flags,
    extra_link_args=["-fopenmp"],
    cxx_std=17,
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
