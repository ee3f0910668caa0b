# waxserve recipes. `just --list` shows them all.

set shell := ["bash", "-euo", "pipefail", "-c"]
# Recipe arguments reach commands as "$@", each one word: `just test -m "not integration"`.
set positional-arguments

python := env_var_or_default("PYTHON", "python3.11")
venv := ".venv"
bin := venv + "/bin"

# Create .venv and install waxserve with its dev tools (again only when pyproject.toml or setup.py change).
setup:
    @[ -x {{bin}}/python ] || {{python}} -m venv {{venv}}
    @if [ ! {{venv}}/.installed -nt pyproject.toml ] || [ ! {{venv}}/.installed -nt setup.py ]; then \
        {{bin}}/python -m pip install --quiet --upgrade pip && \
        {{bin}}/python -m pip install --quiet -e '.[dev]' && \
        touch {{venv}}/.installed; \
    fi

# Run the demo: embedded broker, models, replay, live dataflow, a model swap mid-stream (a JRE for PMML).
demo *ARGS: setup (_debian "java:openjdk-17-jre-headless")
    {{bin}}/waxserve demo "$@"

# Debian packages the tests need: a JRE (PMML, Kafka), Maven and openssl (Kafka's jars and TLS), Prometheus.
system-deps: (_debian "java:openjdk-17-jre-headless mvn:maven openssl:openssl promtool:prometheus")

# Install with apt-get the package of each COMMAND:PACKAGE whose command is missing (as root; else say how).
_debian needs:
    #!/usr/bin/env bash
    set -euo pipefail
    missing=()
    commands=()
    for need in $*; do
        if ! command -v "${need%%:*}" >/dev/null 2>&1; then
            missing+=("${need#*:}")
            commands+=("${need%%:*}")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && exit 0
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "missing: ${commands[*]} (Debian packages: ${missing[*]}); no apt-get here:" >&2
        echo "  install them with your package manager, then run this again" >&2
        exit 1
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing: ${commands[*]}; install the Debian packages with:" >&2
        echo "  sudo apt-get install --no-install-recommends ${missing[*]}" >&2
        exit 1
    fi
    echo "installing ${missing[*]} (apt-get) for ${commands[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The package starts a Prometheus server where systemd runs: the tests start their own.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
        systemctl disable --now prometheus >/dev/null
    fi
    for command in "${commands[@]}"; do
        if ! command -v "$command" >/dev/null 2>&1; then
            echo "installed ${missing[*]}, but $command is still not on PATH ($PATH)" >&2
            exit 1
        fi
    done

# Fetch the Apache Kafka broker's jars with Maven into ~/.cache/waxserve (once per version).
kafka-jars: setup
    {{bin}}/python -m dataflows.tools.kafka_server resolve

# Three pytest-xdist workers, each with brokers of its own: the tests mostly wait on brokers
# and dataflow subprocesses, so even on 2 cores a third worker helps (measured on a
# quiet 2-core machine: 4:37 with -n 2, 3:36 with -n 3). `just test -n 0` runs them in
# one process (for pdb, -s).
# Bytecode is cached under .venv/pycache even where PYTHONDONTWRITEBYTECODE is set (it is
# on these machines): without it, each of the suite's ~150 Python processes compiles
# waxserve again and each worker rewrites every test module's asserts (5.3 s of CPU to
# collect instead of 2.0), and nothing is written into the source tree either way.
pycache := "PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX='" + justfile_directory() + "/" + venv + "/pycache'"

# Run the whole test suite (unit, flow, and integration tests on Apache Kafka; smoke tests on tansu).
test *ARGS: setup system-deps kafka-jars
    {{pycache}} {{bin}}/python -m pytest -n 3 --dist worksteal "$@"

# Run the benchmark-like tests `just test` leaves out (marker `bench`: the benchmark harness on a tiny input).
test-bench *ARGS: setup system-deps kafka-jars
    {{pycache}} {{bin}}/python -m pytest -m bench "$@"

# ruff and mypy.
lint: setup
    {{bin}}/ruff check .
    {{bin}}/ruff format --check dataflows tests bench models/train.py models/train_penguins.py
    {{bin}}/mypy

# Regenerate protos/waxserve_pb2.py(i) and the wine example's descriptor set (models/wine/wine.desc).
protos: setup
    {{bin}}/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. protos/waxserve.proto
    {{bin}}/python -m grpc_tools.protoc -I models/wine --descriptor_set_out=models/wine/wine.desc --include_imports models/wine/wine.proto

# Retrain the example models and reference profiles in models/ (wine, then penguins).
train: setup
    {{bin}}/python models/train.py
    {{bin}}/python models/train_penguins.py

# Start the embedded Kafka-protocol broker (tansu) in the foreground.
broker *ARGS: setup
    {{bin}}/waxserve broker "$@"

# Start Apache Kafka (KRaft, one node, data deleted on exit) in the foreground: just kafka --create-topics
kafka *ARGS: setup kafka-jars
    {{bin}}/python -m dataflows.tools.kafka_server run "$@"

# Run the dataflow against WAXSERVE_BROKERS (workers: -w N; recovery: -r DIR -s S -b S).
run *ARGS: setup
    @mkdir -p "${BYTEWAX_DATAFLOW_API_CACHE_PATH:-.waxserve/bytewax}"
    BYTEWAX_DATAFLOW_API_CACHE_PATH="${BYTEWAX_DATAFLOW_API_CACHE_PATH:-.waxserve/bytewax}" \
        {{bin}}/python -m bytewax.run dataflows.serving:flow "$@"

# Run a local cluster of N processes x W workers on free ports (RECOVERY=DIR: one recovery dir per process).
cluster processes="2" workers="1": setup
    #!/usr/bin/env bash
    set -euo pipefail
    # Ports are free ones, or yours: BYTEWAX_ADDRESSES (one host:port per process, `;`
    # between), WAXSERVE_STATE_PEERS (process i serves its state on the i-th;
    # WAXSERVE_STATE_ADDR='' for none), BYTEWAX_DATAFLOW_API_PORT=P (process i on P + i).
    # A setting you made is never replaced.
    n={{processes}}
    # Free ports, all bound at once so that they differ: cluster, state, API for each process.
    read -r -a free <<<"$({{bin}}/python -c 'import socket, sys
    socks = [socket.socket() for _ in range(3 * int(sys.argv[1]))]
    for s in socks: s.bind(("127.0.0.1", 0))
    print(*(s.getsockname()[1] for s in socks))' "$n")"
    if [ -n "${BYTEWAX_ADDRESSES:-}" ]; then
        addresses=$BYTEWAX_ADDRESSES
    else
        addresses=$(for ((i = 0; i < n; i++)); do printf '127.0.0.1:%d;' "${free[i]}"; done)
        addresses=${addresses%;}
    fi
    IFS=';' read -r -a cluster <<<"$addresses"
    if [ ${#cluster[@]} -ne "$n" ]; then
        echo "BYTEWAX_ADDRESSES has ${#cluster[@]} address(es) for $n processes: $addresses" >&2
        exit 2
    fi
    state=()
    if [ -n "${WAXSERVE_STATE_ADDR+set}" ] && [ -z "$WAXSERVE_STATE_ADDR" ]; then
        :  # the queryable state is turned off
    elif [ -n "${WAXSERVE_STATE_PEERS:-}" ]; then
        IFS=',' read -r -a state <<<"$WAXSERVE_STATE_PEERS"
    elif [ -n "${WAXSERVE_STATE_ADDR:-}" ] && [ "$n" -gt 1 ]; then
        echo "WAXSERVE_STATE_ADDR=$WAXSERVE_STATE_ADDR is one address for $n processes:" \
            "set WAXSERVE_STATE_PEERS (one per process), or WAXSERVE_STATE_ADDR= for none" >&2
        exit 2
    elif [ -n "${WAXSERVE_STATE_ADDR:-}" ]; then
        state=("$WAXSERVE_STATE_ADDR")
    else
        for ((i = 0; i < n; i++)); do state+=("127.0.0.1:${free[n + i]}"); done
        peers="${state[*]}"
        export WAXSERVE_STATE_PEERS=${peers// /,}
    fi
    if [ ${#state[@]} -ne 0 ] && [ ${#state[@]} -ne "$n" ]; then
        echo "WAXSERVE_STATE_PEERS has ${#state[@]} address(es) for $n processes" >&2
        exit 2
    fi
    # Bytewax writes its API cache (dataflow.json) to the working directory unless told.
    export BYTEWAX_DATAFLOW_API_CACHE_PATH=${BYTEWAX_DATAFLOW_API_CACHE_PATH:-.waxserve/bytewax}
    mkdir -p "$BYTEWAX_DATAFLOW_API_CACHE_PATH"
    pids=()
    trap 'kill "${pids[@]}" 2>/dev/null || true; wait' EXIT INT TERM
    for ((i = 0; i < n; i++)); do
        args=(-i "$i" -a "$addresses" -w {{workers}})
        if [ -n "${RECOVERY:-}" ]; then
            {{bin}}/python -m dataflows.tools.recovery --directory "$RECOVERY/process-$i" \
                --partitions "${PARTITIONS:-$((n * 2))}" --layout-processes "$n" \
                --process-id "$i" --dns-timeout 0
            args+=(-r "$RECOVERY/process-$i" -s "${SNAPSHOT_S:-5}" -b "${BACKUP_S:-30}")
        fi
        api=${BYTEWAX_DATAFLOW_API_PORT:+$((BYTEWAX_DATAFLOW_API_PORT + i))}
        api=${api:-${free[2 * n + i]}}
        settings=(BYTEWAX_DATAFLOW_API_PORT="$api")
        if [ ${#state[@]} -ne 0 ]; then
            settings+=(WAXSERVE_STATE_ADDR="${state[i]}")
        fi
        echo "process $i: cluster ${cluster[i]}, state ${state[i]:-off}, API port $api"
        env "${settings[@]}" {{bin}}/python -m bytewax.run dataflows.serving:flow "${args[@]}" &
        pids+=($!)
    done
    [ ${#state[@]} -eq 0 ] || echo "waxserve status --url http://${state[0]}"
    # A Bytewax cluster cannot lose a process: when one exits, stop them all.
    wait -n

# Build the container image with docker or podman (k8s/README.md): just image REGISTRY/waxserve:TAG
image tag="waxserve:0.1.0":
    #!/usr/bin/env bash
    set -euo pipefail
    engine=$(command -v docker || command -v podman || true)
    if [ -z "$engine" ]; then
        echo "no docker or podman on PATH: the Dockerfile builds anywhere with BuildKit" >&2
        exit 1
    fi
    "$engine" build -t "{{tag}}" .

# Validate the deployment offline: kustomize render, kubernetes-validate, yamllint, hadolint.
k8s-validate: setup
    {{bin}}/python -m pytest -q tests/test_deploy.py

# Deploy an overlay (dev or prod) with kubectl; restarts all pods at once if their template changed.
deploy overlay="dev": setup
    #!/usr/bin/env bash
    set -euo pipefail
    kubectl={{bin}}/kubectl
    ns=$($kubectl kustomize k8s/overlays/{{overlay}} | {{bin}}/python -c 'import sys, yaml
    print(next(d["metadata"]["namespace"] for d in yaml.safe_load_all(sys.stdin)
               if d and d["kind"] == "StatefulSet"))')
    # The namespace is not part of the overlay (deleting the overlay must not delete the
    # recovery volumes with it): applied on its own, idempotently.
    $kubectl apply -f k8s/namespaces/{{overlay}}.yaml
    $kubectl apply -k k8s/overlays/{{overlay}}
    # updateStrategy OnDelete: a timely cluster restarts as a whole, never pod by pod.
    for _ in $(seq 30); do
        gen=$($kubectl -n "$ns" get statefulset waxserve \
            -o jsonpath='{.metadata.generation} {.status.observedGeneration}')
        [ "${gen% *}" = "${gen#* }" ] && break
        sleep 1
    done
    want=$($kubectl -n "$ns" get statefulset waxserve -o jsonpath='{.status.updateRevision}')
    have=$($kubectl -n "$ns" get pods -l app.kubernetes.io/component=dataflow \
        -o jsonpath='{range .items[*]}{.metadata.labels.controller-revision-hash}{"\n"}{end}')
    if [ -n "$have" ] && grep -qvx "$want" <<<"$have"; then
        echo "pod template changed: restarting every waxserve pod in $ns"
        $kubectl -n "$ns" delete pod -l app.kubernetes.io/component=dataflow
    fi
    $kubectl -n "$ns" get pods -l app.kubernetes.io/component=dataflow

# Deploy an overlay's dataflow with waxctl instead of k8s/ (k8s/README.md): just deploy-waxctl prod [--dry-run]
deploy-waxctl overlay="dev" *ARGS: setup
    #!/usr/bin/env bash
    set -euo pipefail
    if ! command -v waxctl >/dev/null 2>&1; then
        echo "waxctl is not on PATH. It is Bytewax's closed-source deploy CLI (not on PyPI):" >&2
        echo "download the binary for your OS from Bytewax's downloads page, put it on" >&2
        echo "your PATH and run this again. k8s/README.md (\"waxctl\") compares what it deploys" >&2
        echo "with our manifests; without it, deploy with: just deploy {{overlay}}" >&2
        exit 1
    fi
    args=$({{bin}}/python k8s/waxctl/waxctl_args.py {{overlay}})
    mapfile -t argv <<<"$args"
    waxctl dataflow deploy dataflows/serving.py "${argv[@]}" --yes "${@:2}"

# Start Prometheus (Debian's `prometheus`) on 127.0.0.1:PORT, scraping the dataflow at TARGET with the alert rules loaded.
prometheus port="9090" target="localhost:3030": setup
    #!/usr/bin/env bash
    set -euo pipefail
    prometheus=$(command -v prometheus || echo /usr/bin/prometheus)
    if [ ! -x "$prometheus" ]; then
        echo "prometheus is not installed: apt-get install prometheus (Debian's package)" >&2
        exit 1
    fi
    # Config and data in a scratch directory: this Prometheus is for a look at the demo.
    work=$(mktemp -d -t waxserve-prometheus-XXXXXX)
    trap 'rm -rf "$work"' EXIT
    cat >"$work/prometheus.yml" <<EOF
    global:
      scrape_interval: 5s
      evaluation_interval: 5s
    rule_files:
      - $PWD/k8s/alerts/waxserve-rules.yaml
    scrape_configs:
      - job_name: waxserve
        static_configs:
          - targets: ["{{target}}"]
    EOF
    echo "Prometheus UI: http://127.0.0.1:{{port}}  (alerts: /alerts, targets: /targets)"
    echo "Serve the dataflow's metrics on {{target}}, e.g. in another terminal:"
    echo "  just demo --duration 600"
    echo "Dashboards: k8s/grafana (k8s/README.md, \"Dashboards and alerts\"). Ctrl-C stops."
    "$prometheus" --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
        --web.listen-address="127.0.0.1:{{port}}" --log.level=warn

# Drift alarm calibration: false alarms and detections on resampled wine windows of 100, 1,000, 10,000 records (README "Drift").
drift-eval *ARGS: setup
    {{bin}}/python -m dataflows.monitoring.drift_eval "$@"

# Canary test calibration: simulated canaries checked after every batch; false rollbacks and promotions vs alpha, records to a decision (--quick: a smaller run).
canary-eval *ARGS: setup
    {{bin}}/python -m dataflows.rollout.sequential_eval "$@"

# Bandit simulation: Thompson, UCB1 and an even split on arms of known reward, late rewards; share of traffic on the best arm and regret (--quick: a smaller run).
bandit-sim *ARGS: setup
    {{bin}}/python -m dataflows.rollout.bandit_sim "$@"

# Check the alerting rules and run their unit tests with promtool (k8s/alerts/).
alerts-test:
    promtool check rules k8s/alerts/waxserve-rules.yaml
    promtool test rules k8s/alerts/waxserve-rules.test.yaml

# Regenerate the PrometheusRule (k8s/components/monitoring) from k8s/alerts/waxserve-rules.yaml.
alerts-sync: setup
    {{bin}}/python k8s/alerts/prometheusrule.py

# Benchmark waxserve against the Kafka floor, hand-written loops, Bytewax and Quix Streams (bench/README.md).
bench *ARGS: setup
    {{bin}}/python -m bench "$@"

# Exactly-once under kill -9: 20 random kills of a replay with model swaps, then count every output (bench/exactly_once.py).
exactly-once *ARGS: setup kafka-jars
    {{bin}}/python -m bench.exactly_once "$@"

# Soak: waxserve at 5,000 records/s for 10 minutes, its resident set sampled (bench/README.md).
soak *ARGS: setup
    {{bin}}/python -m bench soak "$@"
