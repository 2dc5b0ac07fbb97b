#!/usr/bin/env bash
# One-time set-up of a machine for qrobust: system packages, the Python package, a Docker
# engine and the sandbox image. Idempotent: a second run only checks.
#
#   bash docker/setup.sh
#
# Needs root for apt-get and dockerd. QROBUST_SKIP_APT=1 skips the system packages.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${QROBUST_SKIP_APT:-0}" != 1 ]] && command -v apt-get >/dev/null; then
    missing=()
    for tool in docker:docker.io dockerd:docker.io bwrap:bubblewrap debootstrap:debootstrap chromium:chromium; do
        command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
    done
    if ((${#missing[@]})); then
        echo "installing system packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
fi

# Install the pinned torch before the project so that pip keeps it: where a local CPU wheel
# is offered (as on CPU-only build machines) pip takes it instead of the CUDA build.
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test,ray]"

bash docker/start_engine.sh
bash docker/build_sandbox_image.sh
echo "qrobust is set up: try 'qrobust run'"
