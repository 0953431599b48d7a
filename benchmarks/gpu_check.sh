#!/usr/bin/env bash
# Every GPU figure of the project in one command (benchmarks/gpu_check.py says what it measures):
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # a machine with one H100/H200: at most ~8 minutes
#   bash benchmarks/gpu_check.sh OUT_DIR --smoke    # any machine: the same parts on tiny shapes (make test runs it)
#
# Wheels in .whl/ (bitsandbytes, trl, datasets and the project's pins of transformers and peft: benchmarks/README.md
# says how to download them) are installed first into a folder of their own, ahead of the machine's packages, with
# no network. The figures land in OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (and beside this script).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [--smoke] [--budget-s SECONDS]}"
shift
PYTHON="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
    site="${TMPDIR:-/tmp}/rpo-gpu-check-site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    # A carried pin that does not import here (another Python, a dependency this machine lacks) gives way to the
    # machine's own version, which the JSON then records; bitsandbytes, trl and datasets have no fallback.
    for name in transformers peft; do
        if ! "$PYTHON" -c "import $name" > /dev/null 2>&1; then
            echo "gpu_check.sh: the carried $name does not import here; using the machine's own" >&2
            rm -rf "$site/$name" "$site/$name"-*.dist-info
        fi
    done
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PYTHON" benchmarks/gpu_check.py --out "$out" "$@"
