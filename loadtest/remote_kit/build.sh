#!/bin/bash
# Packs what `loadtest.bench workers` (and paths) need on a bare x86-64 Linux machine
# that has Python 3.12 with torch, numpy, scipy, psutil, pyyaml and pillow but no Java,
# no redis-server, no network, and takes at most 64 MiB of files a call: the GPU
# machines this project is sometimes lent (see loadtest/remote_kit/README.md).
#
# Writes .devicekit/a (our wheels for Python 3.12, 29 MiB), .devicekit/b (a jlinked
# JRE 17, TorchServe's frontend jar as tar.xz, redis-server with the libraries it links
# beyond glibc, .run/models, 54 MiB) and .devicekit/c (tritonserver with its Python
# backend, the stub for Python 3.12 and the libraries they link). Run here: it needs
# this machine's JDK 17 (jlink), objcopy (binutils), xz, redis-server, pip access to the
# package index, trained models (make models) and .tools/triton (make setup-triton).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
KIT="$(dirname "$0")"
OUT=$REPO/.devicekit
JDK=${JDK:-/usr/lib/jvm/java-17-openjdk-amd64}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
TRITON=$REPO/.tools/triton
# The target's Python; STUBS="3.12 3.11" adds this machine's, to try the kit here.
STUBS=${STUBS:-3.12}
[ -f "$REPO/.run/models/models.json" ] || { echo "no trained models: run make models first" >&2; exit 2; }
[ -x "$TRITON/pytriton/tritonserver/bin/tritonserver" ] || { echo "no .tools/triton: run make setup-triton first" >&2; exit 2; }
rm -rf "$OUT/a" "$OUT/b" "$OUT/c" && mkdir -p "$OUT/a/whl" "$OUT/b" "$OUT/c" "$OUT/wheels"

echo "== wheels for Python 3.12 (cached in .devicekit/wheels)"
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 --platform any \
  -c "$REPO/constraints.txt" -d "$OUT/wheels" \
  grpcio grpcio-health-checking grpcio-reflection grpcio-status protobuf pybreaker pydantic \
  pydantic-settings redis aiokafka sqlalchemy alembic orjson opentelemetry-instrumentation-grpc \
  opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc uvloop hiredis sortedcontainers rich \
  torchserve torch-model-archiver xgboost-cpu hdrhistogram prometheus-client typing-extensions
# The target has these (and they are large): leave them out.
for whl in "$OUT"/wheels/*.whl; do
  case $(basename "$whl") in
    numpy-*|scipy-*|pillow-*|setuptools-*|pygments-*|pyyaml-*|psutil-*|packaging-*|wheel-*|torchserve-*) ;;
    *) cp "$whl" "$OUT/a/whl/" ;;
  esac
done
cp "$KIT/setup.sh" "$OUT/a/"

echo "== JRE (jlink: java.se without debug data)"
"$JDK/bin/jlink" --add-modules java.se,jdk.unsupported,jdk.crypto.ec,jdk.management,jdk.zipfs \
  --strip-debug --strip-native-debug-symbols=objcopy=/usr/bin/objcopy --no-header-files \
  --no-man-pages --compress=2 --output "$WORK/jre"
tar -C "$WORK" -cf - jre | xz -T2 -6 > "$OUT/b/jre.tar.xz"

echo "== TorchServe: the wheel without its 46 MB jar, the jar's files as tar.xz (20 MB)"
python3 - "$OUT/wheels" "$OUT/b" "$WORK" <<'PY'
import sys, zipfile
from pathlib import Path
wheels, out, work = map(Path, sys.argv[1:])
source = next(wheels.glob("torchserve-*.whl"))
jar = "ts/frontend/model-server.jar"
with zipfile.ZipFile(source) as src, zipfile.ZipFile(out / source.name, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if info.filename != jar:
            dst.writestr(info, src.read(info))
    src.extract(jar, work)
with zipfile.ZipFile(work / jar) as jar_file:
    jar_file.extractall(work / "jar")
PY
tar -C "$WORK/jar" -cf - . | xz -T2 -6 > "$OUT/b/jar.tar.xz"

echo "== redis-server and the libraries it links beyond glibc"
mkdir -p "$WORK/redis/bin" "$WORK/redis/lib"
cp "$(command -v redis-server)" "$WORK/redis/bin/redis-server.real"
for lib in $(ldd "$(command -v redis-server)" | awk '/=>/ {print $3}'); do
  case $(basename "$lib") in libc.so*|libm.so*|libstdc++*|libgcc_s*|ld-linux*) ;; *) cp -L "$lib" "$WORK/redis/lib/" ;; esac
done
tar -C "$WORK" -cf - redis | xz -T2 -6 > "$OUT/b/redis.tar.xz"
tar -C "$REPO/.run" -cf - models | xz -T2 -1 > "$OUT/b/models.tar.xz"
cp "$KIT/run.sh" "$OUT/b/"

echo "== Triton: tritonserver, its Python backend, the stubs for Python $STUBS, its libraries"
# The wheel's libraries but the libpython it carries for other stubs (3.13): the stub
# links the target's own libpython.
# (tar's --exclude applies to the names after it only.)
(cd "$TRITON" && tar -cf - --exclude='__pycache__' --exclude='nvidia_pytriton.libs/libpython3*' \
  pytriton/tritonserver/bin pytriton/tritonserver/backends pytriton/tritonserver/caches \
  $(for v in $STUBS; do echo pytriton/tritonserver/python_backend_stubs/$v; done) nvidia_pytriton.libs) \
  | xz -T2 -6 > "$OUT/c/triton.tar.xz"
cp "$KIT/triton.sh" "$OUT/c/"
du -sh "$OUT/a" "$OUT/b" "$OUT/c"
