#!/usr/bin/env bash
# Create the separate venv that the Flower columns of benchmarks/simulation.py, secagg.py and
# deployment.py run in.
#
#   bash benchmarks/flower/setup.sh [VENV_DIR]     (default: benchmarks/.venv-flower)
#
# Installs flwr[simulation] (which brings Ray), torch pinned by the repo's constraints.txt,
# and numpy. Nothing here touches consortium's own environment: Flower is never a dependency
# of the consortium package. Idempotent: does nothing when the venv already imports flwr at the
# pinned version (an older venv is upgraded in place). Override the Flower requirement with
# FLWR_SPEC (default: the version the workers were written and checked against; the deployment
# benchmark needs >= 1.42, whose Fleet API is protobuf over HTTP), and the Python that creates
# the venv with PYTHON.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${1:-$root/benchmarks/.venv-flower}"
python="${PYTHON:-python3}"
flwr_spec="${FLWR_SPEC:-flwr[simulation]==1.42.0}"
want="${flwr_spec##*==}"  # the pinned version, or the whole spec when it pins none

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import flwr, ray, torch, numpy" 2>/dev/null; then
    have="$("$venv/bin/python" -c 'import flwr; print(flwr.__version__)')"
    if [ "$have" = "$want" ] || [ "$want" = "$flwr_spec" ]; then
        echo "Flower venv ready: $venv (flwr $have)" >&2
        exit 0
    fi
    echo "upgrading the Flower venv in $venv from flwr $have to $flwr_spec ..." >&2
else
    echo "creating the Flower venv in $venv ..." >&2
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q -c "$root/constraints.txt" "$flwr_spec" torch numpy
"$venv/bin/python" -c "import flwr, ray, torch, numpy; print('Flower venv ready:', flwr.__version__, 'ray', ray.__version__, 'torch', torch.__version__)" >&2
