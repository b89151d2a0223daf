#!/bin/bash
# Call 1b on the target, after setup.sh and before run.sh on the same machine
# (.devicekit/c carried): tritonserver in /tmp/dk/triton, where run.sh finds it
# (the paths preset's X and Y, `bench workers --model-server triton`). Its Python backend's
# stub links this Python's libpython: where the loader cannot find it, a link to it goes
# in /tmp/dk/pylib, which run.sh puts on LD_LIBRARY_PATH.
set -uo pipefail
untar() { python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="tar")' "$1" "$2"; }
K=$PWD/.devicekit/c
PY=/tmp/v/bin/python3
[ -x "$PY" ] || { echo "no /tmp/v: setup.sh ran on another machine, or not at all"; exit 3; }
rm -rf /tmp/dk/triton && mkdir -p /tmp/dk/triton && untar "$K/triton.tar.xz" /tmp/dk/triton || exit 4
ROOT=/tmp/dk/triton/pytriton/tritonserver
# --help exits 1; the usage it prints says the binary and its libraries load.
USAGE=$("$ROOT/bin/tritonserver" --help 2>&1)
grep -q "^Usage: tritonserver" <<< "$USAGE" \
  || { echo "tritonserver does not run here:"; ldd "$ROOT/bin/tritonserver" | grep "not found"; exit 5; }
VERSION=$($PY -c 'import sysconfig; print(sysconfig.get_python_version())')
STUB=$ROOT/python_backend_stubs/$VERSION/triton_python_backend_stub
[ -x "$STUB" ] || { echo "no stub for Python $VERSION in the kit (build it with STUBS=$VERSION)"; exit 6; }
if ldd "$STUB" | grep -q "libpython.*not found"; then
  read -r LIBDIR LDLIBRARY < <($PY -c 'import sysconfig as s; print(s.get_config_var("LIBDIR"), s.get_config_var("INSTSONAME") or s.get_config_var("LDLIBRARY"))')
  [ -f "$LIBDIR/$LDLIBRARY" ] || { echo "no shared libpython for Python $VERSION ($LIBDIR/$LDLIBRARY): Triton's Python backend cannot run here"; exit 6; }
  mkdir -p /tmp/dk/pylib && ln -sf "$LIBDIR/$LDLIBRARY" /tmp/dk/pylib/
fi
LD_LIBRARY_PATH=/tmp/dk/pylib ldd "$STUB" | grep "not found" && { echo "the stub still lacks a library"; exit 6; }
echo "triton-ok: stub for Python $VERSION$([ -d /tmp/dk/pylib ] && echo ", libpython linked from /tmp/dk/pylib")"
