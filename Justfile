# waxserve recipes. `just --list` shows them all.

set shell := ["bash", "-euo", "pipefail", "-c"]

python := env_var_or_default("PYTHON", "python3.11")
venv := ".venv"
bin := venv + "/bin"

# Create .venv and install waxserve with its dev tools (again only when pyproject.toml changes).
setup:
    @[ -x {{bin}}/python ] || {{python}} -m venv {{venv}}
    @if [ ! {{venv}}/.installed -nt pyproject.toml ]; then \
        {{bin}}/python -m pip install --quiet --upgrade pip && \
        {{bin}}/python -m pip install --quiet -e '.[dev]' && \
        touch {{venv}}/.installed; \
    fi

# Run the demo: embedded broker, models, replay, live dataflow, a model swap mid-stream.
demo *ARGS: setup
    {{bin}}/waxserve demo {{ARGS}}

# Run the whole test suite (unit, flow and integration tests against tansu).
test *ARGS: setup
    {{bin}}/python -m pytest {{ARGS}}

# ruff and mypy.
lint: setup
    {{bin}}/ruff check .
    {{bin}}/ruff format --check dataflows tests models/train.py
    {{bin}}/mypy

# Regenerate protos/waxserve_pb2.py(i) from protos/waxserve.proto.
protos: setup
    {{bin}}/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. protos/waxserve.proto

# Retrain the ONNX models and the reference profile in models/.
train: setup
    {{bin}}/python models/train.py

# Start the embedded Kafka-protocol broker (tansu) in the foreground.
broker *ARGS: setup
    {{bin}}/waxserve broker {{ARGS}}

# Run the dataflow against WAXSERVE_BROKERS (workers: -w N; recovery: -r DIR -s S -b S).
run *ARGS: setup
    {{bin}}/python -m bytewax.run dataflows.serving:flow {{ARGS}}

# Run a local cluster of N processes x W workers (RECOVERY=DIR: one recovery dir per process).
cluster processes="2" workers="1": setup
    #!/usr/bin/env bash
    set -euo pipefail
    n={{processes}}
    addresses=$(for ((i = 0; i < n; i++)); do printf '127.0.0.1:%d;' $((2101 + i)); done)
    addresses=${addresses%;}
    pids=()
    trap 'kill "${pids[@]}" 2>/dev/null || true; wait' EXIT INT TERM
    for ((i = 0; i < n; i++)); do
        args=(-i "$i" -a "$addresses" -w {{workers}})
        if [ -n "${RECOVERY:-}" ]; then
            {{bin}}/waxserve recovery-init "$RECOVERY/process-$i" \
                --partitions "${PARTITIONS:-$((n * 2))}" --processes "$n" --process-id "$i"
            args+=(-r "$RECOVERY/process-$i" -s "${SNAPSHOT_S:-5}" -b "${BACKUP_S:-30}")
        fi
        {{bin}}/python -m bytewax.run dataflows.serving:flow "${args[@]}" &
        pids+=($!)
    done
    # A Bytewax cluster cannot lose a process: when one exits, stop them all.
    wait -n
