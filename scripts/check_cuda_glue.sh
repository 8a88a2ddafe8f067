#!/usr/bin/env bash
# Syntax- and type-check the CUDA torch glue (csrc/cuda/*_glue.cpp) on a machine
# whose torch is a CPU build: such a torch ships c10/cuda headers but not the
# one generated at its build (c10/cuda/impl/cuda_cmake_macros.h), so a stub
# stands in for it. Needs the CUDA toolkit headers; skipped without them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
cuda_inc=""
for d in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")")"; do
  if [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ]; then cuda_inc="$d/include"; break; fi
done
if [ -z "$cuda_inc" ]; then echo "[glue check] no CUDA headers, skipped"; exit 0; fi
stub=$(mktemp -d)
mkdir -p "$stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
mapfile -t torch_inc < <("$PY" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join('-I' + p for p in include_paths()))")
py_inc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
for f in csrc/cuda/*_glue.cpp; do
  # The stub goes last: a CUDA build of torch has the real header and wins.
  g++ -std=c++20 -fsyntax-only -Icsrc/include -Icsrc "${torch_inc[@]}" -I"$cuda_inc" -I"$py_inc" -I"$stub" "$f"
  echo "[glue check] $f OK"
done
rm -rf "$stub"
