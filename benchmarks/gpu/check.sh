#!/usr/bin/env bash
# The GPU check, on the device machine (one H200; see docs/benchmarks.md#gpu-check):
#   here, once:   bash benchmarks/gpu/gather_wheels.sh       (wheels + RMB samples into benchmarks/gpu/carry/)
#   device tool:  run(command="bash benchmarks/gpu/check.sh", carry=["benchmarks/gpu/carry"], timeout_s=540)
# Installs the carried wheels into /tmp/site, then runs benchmarks/gpu/check.py (whose options it passes on),
# which stays inside its 450 s budget; the table goes to stdout, the JSON to $OUT (or benchmarks/gpu/out/).
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=benchmarks/gpu/carry/wheels
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no wheels in $WHEELS: trl, datasets and liger-kernel must already be installed" >&2
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, trl, datasets; print('torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| cuda', torch.cuda.is_available())"
JSON="${OUT:-benchmarks/gpu/out}/gpu_check.json"
exec timeout 500 python3 benchmarks/gpu/check.py --json "$JSON" "$@"
