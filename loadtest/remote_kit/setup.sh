#!/bin/bash
# Call 1 on the target (.devicekit/a carried): our wheels in /tmp/site and a venv at
# /tmp/v whose .pth files put them ahead of the image's own environment (torch and the
# rest). Prints the versions and libraries call 2 relies on.
set -uo pipefail
K=$PWD/.devicekit/a
echo "== machine"; nproc; free -g | head -2; python3 --version; command -v python3; uname -r
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$K"/whl/*.whl 2>&1 \
  | grep -v "^WARNING: Target directory" | tail -5
TORCH_SP=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
python3 -m venv --without-pip /tmp/v || { echo "no venv here (python3 -m venv failed)"; exit 4; }
SP=$(/tmp/v/bin/python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo 'import site; site.addsitedir("/tmp/site")' > "$SP/00-devicekit.pth"
echo "import site; site.addsitedir(\"$TORCH_SP\")" > "$SP/zz-torch.pth"
/tmp/v/bin/python3 -c 'import sys, grpc, google.protobuf, redis, aiokafka, sqlalchemy, xgboost, torch, numpy, psutil, uvloop, hdrh, yaml, pydantic; print("imports ok:", sys.executable, "grpc", grpc.__version__, "protobuf", google.protobuf.__version__, "torch", torch.__version__, "numpy", numpy.__version__, "psutil", psutil.__version__)' || exit 5
echo "== libs redis needs, present here?"
for lib in libatomic.so.1 liblzf.so.1 libjemalloc.so.2 libsystemd.so.0 libssl.so.3 libcrypto.so.3; do
  if ldconfig -p | grep -q "$lib"; then echo "$lib yes"; else echo "$lib NO (the kit's copy is used)"; fi
done
echo setup-ok
