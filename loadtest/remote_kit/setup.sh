#!/bin/bash
# Call 1 on the target (.devicekit/a carried): our wheels in /tmp/site, ahead of the
# image's torch venv, through a venv at /tmp/v whose .pth files add both (or, without
# venv, PYTHONPATH in call 2). Prints the versions and libraries call 2 relies on.
set -uo pipefail
K=$PWD/.devicekit/a
echo "== machine"; nproc; free -g | head -2; python3 --version; which python3; uname -r
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $K/whl/*.whl 2>&1 | grep -v "^WARNING: Target directory" | tail -5
TORCH_SP=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if python3 -m venv --without-pip /tmp/v; then
  SP=$(/tmp/v/bin/python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo 'import site; site.addsitedir("/tmp/site")' > $SP/00-devicekit.pth
  echo "import site; site.addsitedir(\"$TORCH_SP\")" > $SP/zz-torch.pth
  PY=/tmp/v/bin/python3
else
  echo "no venv here: call 2 uses $(which python3) with PYTHONPATH"; rm -rf /tmp/v
  PY=python3; export PYTHONPATH=/tmp/site
fi
$PY -c 'import sys, grpc, google.protobuf, redis, aiokafka, sqlalchemy, xgboost, torch, numpy, psutil, uvloop, hdrh, yaml, pydantic; print("imports ok:", sys.executable, "grpc", grpc.__version__, "protobuf", google.protobuf.__version__, "torch", torch.__version__, "numpy", numpy.__version__, "pydantic", pydantic.__version__)' || exit 5
echo "== libs redis needs, present here?"; for l in libatomic.so.1 liblzf.so.1 libjemalloc.so.2 libsystemd.so.0 libssl.so.3 libcrypto.so.3; do ldconfig -p | grep -q "$l" && echo "$l yes" || echo "$l NO"; done
echo setup-ok
