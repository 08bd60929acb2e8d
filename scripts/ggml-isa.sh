#!/usr/bin/env bash
# The CMake options that choose ggml's CPU instruction sets for the builds of the pinned
# llama.cpp source (integrations/llama.cpp/build.sh, scripts/build-ggml-peer.sh), one per
# line.
#
# Normally just -DGGML_NATIVE=ON (-march=native). A virtual machine can list AMX among the
# CPU's flags and still fault on the first tile instruction; -march=native then builds
# ggml's AMX kernels in and llama.cpp dies on SIGILL in its first matrix product. Where the
# CPU lists AMX and a probe program cannot run a tile instruction, the compiler flags are
# -march=native with AMX switched off (-mno-amx-*), given as CMAKE_C/CXX_FLAGS, and ggml's
# own options name the instruction sets from /proc/cpuinfo, AMX left out; everything else
# -march=native enables (AVX512-FP16, for one) stays on.
set -euo pipefail
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has() { [[ "$flags" == *" $1 "* ]]; }

# Whether this machine runs AMX tile instructions (after asking the kernel for the tile
# state, as ggml does).
amx_runs() {
  local dir
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' RETURN
  cat > "$dir/amx.c" <<'C'
#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA */
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return 1;
    unsigned char cfg[64];
    memset(cfg, 0, sizeof cfg);
    cfg[0] = 1;   /* palette 1 */
    cfg[16] = 64; /* tile 0: 64 bytes per row */
    cfg[48] = 16; /* tile 0: 16 rows */
    _tile_loadconfig(cfg);
    _tile_zero(0);
    _tile_release();
    return 0;
}
C
  # (through sh, so that the note of a killed program goes to sh's silenced stderr)
  gcc -O1 -mamx-tile -o "$dir/amx" "$dir/amx.c" 2>/dev/null && sh -c '"$1"' sh "$dir/amx" 2>/dev/null
}

if ! has amx_tile || amx_runs; then
  echo "-DGGML_NATIVE=ON"
  exit 0
fi
echo "ggml-isa.sh: the CPU lists AMX but cannot run it here; building for it without AMX" >&2
native="-march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
on() { if has "$1"; then echo ON; else echo OFF; fi; }
avx512=OFF
if has avx512f && has avx512cd && has avx512vl && has avx512dq && has avx512bw; then avx512=ON; fi
cat <<OPTS
-DGGML_NATIVE=OFF
-DCMAKE_C_FLAGS=$native
-DCMAKE_CXX_FLAGS=$native
-DGGML_SSE42=$(on sse4_2)
-DGGML_AVX=$(on avx)
-DGGML_AVX2=$(on avx2)
-DGGML_FMA=$(on fma)
-DGGML_F16C=$(on f16c)
-DGGML_BMI2=$(on bmi2)
-DGGML_AVX_VNNI=$(on avx_vnni)
-DGGML_AVX512=$avx512
-DGGML_AVX512_VBMI=$(on avx512vbmi)
-DGGML_AVX512_VNNI=$(on avx512_vnni)
-DGGML_AVX512_BF16=$(on avx512_bf16)
-DGGML_AMX_TILE=OFF
-DGGML_AMX_INT8=OFF
-DGGML_AMX_BF16=OFF
OPTS
