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
