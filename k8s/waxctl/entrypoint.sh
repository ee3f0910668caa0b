#!/bin/sh
# Entry point of the waxserve image under waxctl. waxctl deploys with Bytewax's Helm chart,
# whose containers run `sh ./entrypoint.sh` in the image's working directory (/app here).
# Our own manifests (k8s/base) do not use this file.
set -eu

# The chart always sets BYTEWAX_DATAFLOW_API_CACHE_PATH but mounts a volume there only with
# its API sidecar; Bytewax stops at start-up when the path is not a writable directory.
cache="${BYTEWAX_DATAFLOW_API_CACHE_PATH:-/tmp/bytewax-api}"
if ! mkdir -p "$cache" 2>/dev/null || [ ! -w "$cache" ]; then
    cache=/tmp/bytewax-api
    mkdir -p "$cache"
fi
export BYTEWAX_DATAFLOW_API_CACHE_PATH="$cache"

# Per-pod recovery volumes: create this pod's share of the partitions (never touching
# existing ones). The chart's recovery init container does not know the process count,
# so it happens here, before the dataflow starts (k8s/README.md, "waxctl").
if [ -n "${BYTEWAX_RECOVERY_DIRECTORY:-}" ] && [ -n "${RECOVERY_PARTITIONS:-}" ]; then
    python -m dataflows.tools.recovery --dns-timeout 0
fi

# The installed dataflow; the copy of dataflows/serving.py that waxctl uploads is not used.
exec python -m bytewax.run dataflows.serving:flow
