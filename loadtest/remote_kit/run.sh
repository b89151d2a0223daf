#!/bin/bash
# Call 2 on the target, right after setup.sh (and triton.sh) on the same machine
# (.devicekit/b carried): TorchServe's jar, the JRE and redis-server from the carry,
# then one `loadtest.bench workers` run per argument (each argument one run's arguments),
# and `loadtest.bench paths` too with PATHS=1.
# Figures and logs go to $OUT: 2 files a workers run (3 with TIMELINE=1: the servers'
# decisions over time, from their kept audit store), 3 for paths, and at most 8 files
# come back from a call (4 runs, 2 with TIMELINE=1 or with paths).
set -uo pipefail
: "${OUT:?set OUT to the folder the figures go to}"
untar() { python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="tar")' "$1" "$2"; }
K=$PWD/.devicekit/b
PY=/tmp/v/bin/python3
[ -x "$PY" ] || { echo "no /tmp/v: setup.sh ran on another machine, or not at all"; exit 3; }
mkdir -p /tmp/dk && untar "$K/jre.tar.xz" /tmp/dk && /tmp/dk/jre/bin/java -version 2>&1 | head -1 || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-ts "$K"/torchserve-*.whl || exit 4
SP=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo 'import site; site.addsitedir("/tmp/site-ts")' > "$SP/01-torchserve.pth"
echo "$PWD/client" > "$SP/02-decision-client.pth"  # decision_client, from this checkout
mkdir -p /tmp/site-ts/ts/frontend /tmp/dk/jar && untar "$K/jar.tar.xz" /tmp/dk/jar || exit 4
(cd /tmp/dk/jar && $PY -c '
import os, zipfile
names = sorted(os.path.join(d, f)[2:] for d, _, fs in os.walk(".") for f in fs)
names.sort(key=lambda n: n != "META-INF/MANIFEST.MF")
with zipfile.ZipFile("/tmp/site-ts/ts/frontend/model-server.jar", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
    for n in names: z.write(n, n)
print("jar entries", len(names))') || exit 4
# The launcher TorchServe's replicas are started with: beside the interpreter.
printf '#!%s\nimport sys\nfrom ts.model_server import start\nsys.exit(start())\n' "$PY" > /tmp/v/bin/torchserve
chmod +x /tmp/v/bin/torchserve
mkdir -p /tmp/dk/redis-lib && untar "$K/redis.tar.xz" /tmp/dk || exit 5
for lib in /tmp/dk/redis/lib/*; do
  ldconfig -p | grep -q "$(basename "$lib")" || ln -sf "$lib" /tmp/dk/redis-lib/
done
printf '#!/bin/sh\nLD_LIBRARY_PATH=/tmp/dk/redis-lib exec /tmp/dk/redis/bin/redis-server.real "$@"\n' > /tmp/dk/redis/bin/redis-server
chmod +x /tmp/dk/redis/bin/redis-server
export PATH=/tmp/dk/redis/bin:/tmp/v/bin:$PATH JAVA_HOME=/tmp/dk/jre PYTHONUNBUFFERED=1
redis-server --version || exit 5
mkdir -p .run && untar "$K/models.tar.xz" .run || exit 6
# Triton, where triton.sh put it (the paths preset's X and Y need it).
if [ -d /tmp/dk/triton ]; then
  mkdir -p .tools && ln -sfn /tmp/dk/triton .tools/triton
  [ -d /tmp/dk/pylib ] && export LD_LIBRARY_PATH=/tmp/dk/pylib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
else
  echo "no /tmp/dk/triton (triton.sh not run): PATHS=1 and --model-server triton will fail"
fi
$PY -c 'import server.app, loadtest.bench, ts.model_server; print("imports ok")' || exit 6
[ $# -gt 0 ] || set -- "--workers 1,2,4,8 --seconds 2.5"
run=0
for args in "$@"; do
  run=$((run + 1))
  echo "== bench workers $args"; date -u
  # Run numbers restart with each call: a kept folder of an earlier call goes first.
  kept=/tmp/dk/keep-$run
  rm -rf "$kept"
  keep=()
  [ "${TIMELINE:-0}" = 1 ] && keep=(--keep "$kept")
  # $args unquoted: it is one run's arguments, split into words.
  # shellcheck disable=SC2086
  timeout "${WORKERS_S:-280}" "$PY" -m loadtest.bench workers $args "${keep[@]}" \
    --json "$OUT/bench_workers-$run.json" 2>&1 | tee "$OUT/bench_workers-$run.log"
  [ "${TIMELINE:-0}" = 1 ] || continue
  # The servers' decisions (they share one audit store), half a second a line.
  "$PY" -m server.audit --database-url "sqlite:///$kept/audit.db" timeline --since 2h \
    --step 0.5 --reasons 3 --limit 5000000 > "$OUT/timeline-$run.txt" 2>&1
done
if [ "${PATHS:-0}" = 1 ]; then
  echo "== bench paths"; date -u
  timeout "${PATHS_S:-220}" "$PY" -m loadtest.bench paths --processes 6 --rounds 1 \
    --json "$OUT/bench_paths.json" --png "$OUT/bench_paths.png" 2>&1 | tee "$OUT/bench_paths.log"
fi
date -u
