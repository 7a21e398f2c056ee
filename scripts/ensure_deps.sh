#!/usr/bin/env bash
# Checks what building and testing retention needs; installs what is missing with apt-get when
# it may (root, or passwordless sudo), otherwise prints the command to run and fails.
# apt-get is only called when something is missing.
#
# Environment (mainly for testing this script):
#   RETENTION_DEPS_SYSROOT=/dir   look for files under /dir instead of / (fake a bare system)
#   RETENTION_DEPS_DRY_RUN=1      report what would be installed, install nothing, exit 0
#   RETENTION_DEPS_OPTIONAL=1     also install what the optional parts need (CI tests them all):
#                                 nlohmann-json (safetensors I/O), OpenBLAS (RETENTION_USE_BLAS),
#                                 OpenMPI (context parallelism), pybind11 + NumPy + PyTorch +
#                                 pytest (the Python module and its tests)
set -euo pipefail

sysroot="${RETENTION_DEPS_SYSROOT:-}"
dry_run="${RETENTION_DEPS_DRY_RUN:-0}"

# Search prefixes: the usual ones plus CMAKE_PREFIX_PATH (colon separated).
prefixes=(/usr /usr/local)
if [[ -n "${CMAKE_PREFIX_PATH:-}" ]]; then
  IFS=: read -r -a extra <<<"${CMAKE_PREFIX_PATH}"
  prefixes+=("${extra[@]}")
fi

# have_file <relative path pattern>...: true if any prefix holds a match.
have_file() {
  local prefix pattern f
  for prefix in "${prefixes[@]}"; do
    for pattern in "$@"; do
      for f in "${sysroot}${prefix}"/${pattern}; do
        [[ -e "$f" ]] && return 0
      done
    done
  done
  return 1
}

have_cmd() {
  if [[ -n "$sysroot" ]]; then
    [[ -x "${sysroot}/usr/bin/$1" || -x "${sysroot}/usr/local/bin/$1" ]]
  else
    command -v "$1" >/dev/null 2>&1
  fi
}

missing=()   # human-readable names
packages=()  # Debian packages that provide them
need() { missing+=("$1"); packages+=("$2"); }

have_cmd cmake || need "cmake" cmake
have_cmd make || need "make" make
if [[ -n "${CXX:-}" ]]; then
  have_cmd "${CXX%% *}" || need "C++ compiler (\$CXX=${CXX})" g++
else
  have_cmd g++ || have_cmd c++ || need "C++ compiler" g++
fi
# CMake needs Eigen's package file (find_package(Eigen3 NO_MODULE)), not only its headers.
eigen_ok=0
if [[ -n "${Eigen3_DIR:-}" && -e "${sysroot}${Eigen3_DIR}/Eigen3Config.cmake" ]]; then
  eigen_ok=1
elif have_file include/eigen3/Eigen/Core &&
  have_file share/eigen3/cmake/Eigen3Config.cmake lib/cmake/eigen3/Eigen3Config.cmake \
    'lib/*/cmake/eigen3/Eigen3Config.cmake'; then
  eigen_ok=1
fi
((eigen_ok)) || need "Eigen >= 3.4" libeigen3-dev
have_file include/gtest/gtest.h || need "GoogleTest" libgtest-dev
have_file include/benchmark/benchmark.h || need "Google Benchmark" libbenchmark-dev
have_file include/stb/stb_image.h || need "stb (stb_image.h)" libstb-dev
if [[ "${RETENTION_DEPS_OPTIONAL:-0}" == 1 ]]; then
  have_file include/nlohmann/json.hpp || need "nlohmann-json" nlohmann-json3-dev
  have_file 'lib/*/libopenblas.so' lib/libopenblas.so || need "OpenBLAS" libopenblas-dev
  have_file 'lib/*/openmpi/include/mpi.h' include/mpi.h 'include/*/mpi.h' ||
    need "OpenMPI" libopenmpi-dev
  have_cmd mpirun || need "mpirun" openmpi-bin
  have_file 'include/pybind11/pybind11.h' || need "pybind11" pybind11-dev
  have_file 'lib/python3/dist-packages/pybind11/__init__.py' || need "pybind11 (Python)" python3-pybind11
  have_file 'include/python3*/Python.h' || need "Python headers" python3-dev
  have_file 'lib/python3/dist-packages/numpy/__init__.py' || need "NumPy" python3-numpy
  have_file 'lib/python3/dist-packages/pytest/__init__.py' 'lib/python3/dist-packages/_pytest/__init__.py' ||
    need "pytest" python3-pytest
  have_file 'lib/python3/dist-packages/torch/__init__.py' || need "PyTorch" python3-torch
fi

if ((${#missing[@]} == 0)); then
  echo "ensure_deps: all dependencies present"
  exit 0
fi

echo "ensure_deps: missing: $(IFS=,; echo "${missing[*]}" | sed 's/,/, /g')"
install_line="apt-get install -y ${packages[*]}"

if [[ "$(id -u)" == 0 ]]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo)
else
  echo "ensure_deps: not root and no passwordless sudo; install them with:" >&2
  echo "  sudo ${install_line}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_deps: no apt-get here; install the equivalent of: ${packages[*]}" >&2
  exit 1
fi

if [[ "$dry_run" == 1 ]]; then
  echo "ensure_deps: dry run, would run: ${sudo[*]:+${sudo[*]} }apt-get update && ${sudo[*]:+${sudo[*]} }${install_line}"
  exit 0
fi

echo "ensure_deps: installing ${packages[*]}"
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}"
echo "ensure_deps: done"
