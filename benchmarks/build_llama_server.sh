#!/usr/bin/env bash
# Build llama.cpp's `llama-server` for the benchmark's peer (issue 16) and print
# the path of the binary as the last line on stdout. Everything else goes to
# stderr, so callers can do:  server="$(benchmarks/build_llama_server.sh | tail -n 1)"
#
# Source: the llama.cpp tree vendored in the llama-cpp-python sdist on PyPI
# (vendor/llama.cpp), pinned by exact version and sha256 below. PyPI is the only
# place the project's machines can fetch from, and an sdist pinned by hash is a
# reproducible source for the same llama.cpp revision on every machine.
#
# Result: ${OVMS_PLUGIN_CACHE:-$HOME/.cache/ovms-plugin}/llama.cpp/<version>-<flags-hash>/bin/llama-server
# The flags hash covers the sdist hash and every cmake flag, so a machine with
# other CPU features, or other LLAMA_CMAKE_FLAGS, gets a build of its own. A
# cached binary that still answers --version is reused without rebuilding. A
# build happens in a temporary folder beside the cache entry and is moved into
# place only when finished, so an interrupted build never leaves a half entry.
#
# cmake flags, always set (base):
#   CMAKE_BUILD_TYPE=Release     optimised code; the binary is a benchmark peer.
#   GGML_NATIVE=OFF              -march=native would also switch on AMX on CPUs
#                                that report it; a native build died with
#                                "Illegal instruction" on a project machine. The
#                                ISA flags below are set one by one instead.
#   GGML_AMX_TILE/INT8/BF16=OFF  never AMX, for the same reason (always OFF, also
#                                when LLAMA_CMAKE_FLAGS is given).
#   BUILD_SHARED_LIBS=OFF        libllama/libggml/mtmd linked in statically: the
#                                binary runs from the cache alone (it still uses
#                                the system's libstdc++, libgomp and libc).
#   GGML_BACKEND_DL=OFF          CPU backend compiled into the binary, no .so
#                                backends loaded at run time.
#   LLAMA_CURL=OFF               no libcurl (the server never downloads models
#                                here; newer trees ignore the option with a note).
#   LLAMA_OPENSSL=OFF            no libssl: it only listens on loopback over HTTP.
#   LLAMA_BUILD_TESTS/EXAMPLES=OFF
#                                nothing but what llama-server needs is configured.
#   LLAMA_BUILD_TOOLS/SERVER=ON  the server lives under tools/.
#   LLAMA_BUILD_UI=OFF, LLAMA_USE_PREBUILT_UI=OFF
#                                the web UI would need npm or a download from
#                                outside; the API does not need it.
#   LLAMA_BUILD_COMMIT=llama-cpp-python-<version>
#                                the sdist has no .git, so --version names the
#                                sdist it came from instead of "unknown".
#
# cmake flags for the CPU (extra; replaced whole by LLAMA_CMAKE_FLAGS if set):
#   GGML_SSE42, GGML_AVX, GGML_AVX2, GGML_BMI2, GGML_FMA, GGML_F16C, GGML_AVX_VNNI,
#   GGML_AVX512, GGML_AVX512_VBMI, GGML_AVX512_VNNI, GGML_AVX512_BF16
#                                each ON when /proc/cpuinfo lists the feature,
#                                else OFF; an option that the pinned tree's
#                                ggml/CMakeLists.txt does not define is left out.
#   e.g. LLAMA_CMAKE_FLAGS="-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
#
# Other environment:
#   OVMS_PLUGIN_CACHE   cache root (default $HOME/.cache/ovms-plugin)
#   LLAMA_SDIST         a local copy of the pinned sdist to use instead of pip
#                       download (it must still match the pinned sha256)
#   LLAMA_BUILD_JOBS    parallel jobs (default: nproc)
#
# Needs: pip, cmake >= 3.14, a C/C++ compiler; ninja is used when present.
# A build of the llama-server target takes about 15 minutes on 2 cores.
set -euo pipefail

readonly LCP_VERSION="0.3.36"
readonly LCP_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
readonly LCP_SDIST="llama_cpp_python-${LCP_VERSION}.tar.gz"

log() { printf 'build_llama_server: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

cache_root="${OVMS_PLUGIN_CACHE:-$HOME/.cache/ovms-plugin}/llama.cpp"

# --- flags -------------------------------------------------------------------

base_flags=(
    -DCMAKE_BUILD_TYPE=Release
    -DGGML_NATIVE=OFF
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_BACKEND_DL=OFF
    -DLLAMA_CURL=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    "-DLLAMA_BUILD_COMMIT=llama-cpp-python-${LCP_VERSION}"
)
# Last on the command line, so that no override can switch AMX back on.
amx_flags=(-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)

# "cpuinfo-flag:GGML_OPTION" pairs.
readonly CPU_FEATURES=(
    sse4_2:GGML_SSE42
    avx:GGML_AVX
    avx2:GGML_AVX2
    bmi2:GGML_BMI2
    fma:GGML_FMA
    f16c:GGML_F16C
    avx_vnni:GGML_AVX_VNNI
    avx512f:GGML_AVX512
    avx512vbmi:GGML_AVX512_VBMI
    avx512_vnni:GGML_AVX512_VNNI
    avx512_bf16:GGML_AVX512_BF16
)

cpu_flags=()
if [[ -n "${LLAMA_CMAKE_FLAGS:-}" ]]; then
    read -r -a cpu_flags <<<"${LLAMA_CMAKE_FLAGS}"
    log "CPU flags from LLAMA_CMAKE_FLAGS: ${cpu_flags[*]}"
else
    [[ -r /proc/cpuinfo ]] || die "/proc/cpuinfo is not readable; set LLAMA_CMAKE_FLAGS"
    have=" $(grep -m 1 '^flags' /proc/cpuinfo | cut -d: -f2-) "
    for pair in "${CPU_FEATURES[@]}"; do
        feature="${pair%%:*}"
        option="${pair#*:}"
        if [[ "$have" == *" ${feature} "* ]]; then
            cpu_flags+=("-D${option}=ON")
        else
            cpu_flags+=("-D${option}=OFF")
        fi
    done
    log "CPU flags from /proc/cpuinfo: ${cpu_flags[*]}"
fi

flags_hash="$(printf '%s\n' "$LCP_SHA256" "${base_flags[@]}" "${cpu_flags[@]}" "${amx_flags[@]}" |
    sha256sum | cut -c1-12)"
entry="${cache_root}/${LCP_VERSION}-${flags_hash}"
binary="${entry}/bin/llama-server"

# --- cached? -----------------------------------------------------------------

if [[ -x "$binary" ]]; then
    if "$binary" --version >/dev/null 2>&1; then
        log "cached: $binary"
        printf '%s\n' "$binary"
        exit 0
    fi
    log "cached binary does not run; rebuilding: $binary"
fi

# --- fetch and verify the sdist ----------------------------------------------

for tool in cmake sha256sum tar; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
done

mkdir -p "$cache_root"
work="$(mktemp -d "${cache_root}/.build.XXXXXX")"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

sdist="${LLAMA_SDIST:-}"
if [[ -z "$sdist" ]]; then
    command -v pip >/dev/null 2>&1 || die "pip is required (or set LLAMA_SDIST)"
    log "downloading llama-cpp-python==${LCP_VERSION} (sdist) from the package index"
    pip download --quiet --no-deps --no-binary :all: \
        -d "${work}/dl" "llama-cpp-python==${LCP_VERSION}" >&2 ||
        die "pip download of llama-cpp-python==${LCP_VERSION} failed"
    sdist="${work}/dl/${LCP_SDIST}"
fi
[[ -f "$sdist" ]] || die "sdist not found: $sdist"

actual="$(sha256sum "$sdist" | cut -d' ' -f1)"
[[ "$actual" == "$LCP_SHA256" ]] ||
    die "sha256 mismatch for $sdist: got $actual, pinned $LCP_SHA256"
log "sha256 verified: $LCP_SHA256"

src="${work}/src"
mkdir -p "$src"
tar -xzf "$sdist" -C "$src" --strip-components=3 \
    "llama_cpp_python-${LCP_VERSION}/vendor/llama.cpp"
[[ -f "${src}/tools/server/CMakeLists.txt" ]] ||
    die "the sdist has no vendor/llama.cpp/tools/server"

# Leave out CPU options this tree does not define (cmake would only warn).
ggml_lists="${src}/ggml/CMakeLists.txt"
kept_cpu_flags=()
for flag in "${cpu_flags[@]}"; do
    name="${flag#-D}"
    name="${name%%=*}"
    name="${name%%:*}"
    if [[ "$name" == GGML_* ]] && ! grep -q "option(${name}[[:space:]]" "$ggml_lists"; then
        log "skipping ${flag}: no such option in this llama.cpp"
        continue
    fi
    kept_cpu_flags+=("$flag")
done

# --- configure and build -----------------------------------------------------

generator=()
if command -v ninja >/dev/null 2>&1; then
    generator=(-G Ninja)
fi

cmake_flags=("${base_flags[@]}" "${kept_cpu_flags[@]}" "${amx_flags[@]}")
log "cmake flags: ${cmake_flags[*]}"

build="${work}/build"
started=$SECONDS
cmake -S "$src" -B "$build" "${generator[@]}" "${cmake_flags[@]}" >&2
cmake --build "$build" --target llama-server -j "${LLAMA_BUILD_JOBS:-$(nproc)}" >&2
log "built in $((SECONDS - started)) s"

built="${build}/bin/llama-server"
[[ -x "$built" ]] || die "the build left no ${built}"
"$built" --version >&2 || die "the new binary does not run (--version failed)"

# --- install atomically ------------------------------------------------------

out="${work}/out"
mkdir -p "${out}/bin"
cp "$built" "${out}/bin/llama-server"
printf '%s\n' "${cmake_flags[@]}" >"${out}/cmake-flags.txt"
printf 'llama-cpp-python==%s sha256=%s\n' "$LCP_VERSION" "$LCP_SHA256" >"${out}/source.txt"

if [[ -e "$entry" ]]; then
    # A broken entry (its binary did not run above): move it aside first.
    mv -T "$entry" "${work}/stale"
fi
if ! mv -T "$out" "$entry" 2>/dev/null; then
    # Another build finished first; use its binary if it runs.
    "$binary" --version >/dev/null 2>&1 || die "could not install into $entry"
    log "another build installed $entry first; using it"
fi

log "installed: $binary"
printf '%s\n' "$binary"
