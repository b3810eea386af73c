#!/usr/bin/env bash
# Replace Pillow by pillow-simd (faster resizing; see docs/benchmarks.md) in the venv whose bin/ is $1.
# pillow-simd builds from source; where the build fails (no compiler, no libjpeg/zlib headers) the pinned Pillow
# stays installed and a warning says so: everything works, preprocessing is just slower.
set -uo pipefail
BIN=${1:-.venv/bin}
VERSION=${PILLOW_SIMD_VERSION:-12.1.1.post0}
PIP=("$BIN/pip" --quiet --disable-pip-version-check)
if [ "${ALEXNET_SKIP_PILLOW_SIMD:-0}" = "1" ]; then
  echo "pillow-simd: skipped (ALEXNET_SKIP_PILLOW_SIMD=1); using Pillow"; exit 0
fi
if "$BIN/python" -c "import PIL, sys; sys.exit(0 if '.post' in PIL.__version__ else 1)" 2>/dev/null; then
  echo "pillow-simd: already installed ($("$BIN/python" -c 'import PIL; print(PIL.__version__)'))"; exit 0
fi
cflags=""
grep -qw avx2 /proc/cpuinfo 2>/dev/null && cflags="-mavx2"
work=$(mktemp -d)
echo "pillow-simd: building $VERSION from source (about a minute)..."
if CC="cc $cflags" "${PIP[@]}" wheel --no-deps -w "$work" "pillow-simd==$VERSION" >"$work/build.log" 2>&1; then
  # Both distributions own the PIL package: remove Pillow first, then install the freshly built wheel.
  "${PIP[@]}" uninstall -y pillow >/dev/null 2>&1 || true
  # --force-reinstall: a venv re-set-up after a pyproject change still lists pillow-simd while Pillow owns PIL/
  if "${PIP[@]}" install --no-deps --force-reinstall "$work"/pillow_simd-*.whl >>"$work/build.log" 2>&1 \
     && "$BIN/python" -c "from PIL import features; assert features.check('jpg') and features.check('zlib')" >>"$work/build.log" 2>&1; then
    echo "pillow-simd: installed ($("$BIN/python" -c 'import PIL; print(PIL.__version__)'))"
    rm -rf "$work"; exit 0
  fi
fi
echo "WARNING: pillow-simd could not be built or imported (log: $work/build.log); falling back to Pillow." >&2
echo "WARNING: preprocessing will be slower per core (see docs/benchmarks.md)." >&2
"${PIP[@]}" uninstall -y pillow-simd >/dev/null 2>&1 || true
"${PIP[@]}" install -c constraints.txt --force-reinstall --no-deps pillow 2>&1 | grep -v "^WARNING: Location" || true
exit 0
