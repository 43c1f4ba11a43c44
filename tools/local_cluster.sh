#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine: a head and N worker nodes started with
# `ray start` on loopback, each with its own ports; `stop` stops exactly the processes this
# script started (everything under its temporary folder), never other Ray instances.
#
#   tools/local_cluster.sh start 2          # head + 2 worker nodes, 1 CPU each
#   tools/local_cluster.sh status
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8275 --working-dir . -- \
#       raymeta sweep sweeps/quickstart.yaml --address auto
#   tools/local_cluster.sh stop
#
# Settings (environment): RAYMETA_CLUSTER_DIR (/tmp/rmcluster), RAYMETA_CLUSTER_PORT (6390),
# RAYMETA_DASHBOARD_PORT (8275), RAYMETA_CPUS_PER_NODE (1), RAYMETA_PORT_BASE (24000).
# Token authentication is on (Ray's default since 2.59): every shell that talks to the
# cluster needs RAY_AUTH_MODE=token; the token is ~/.ray/auth_token.
set -euo pipefail

DIR=${RAYMETA_CLUSTER_DIR:-/tmp/rmcluster}
PORT=${RAYMETA_CLUSTER_PORT:-6390}
DASHBOARD=${RAYMETA_DASHBOARD_PORT:-8275}
CPUS=${RAYMETA_CPUS_PER_NODE:-1}
BASE=${RAYMETA_PORT_BASE:-24000}
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0

node_ports() {  # distinct agent ports per node, so nodes on one machine never collide
  local b=$((BASE + 10 * $1))
  echo "--node-manager-port=$b --object-manager-port=$((b + 1)) \
--dashboard-agent-listen-port=$((b + 2)) --dashboard-agent-grpc-port=$((b + 3)) \
--runtime-env-agent-port=$((b + 4)) --metrics-export-port=$((b + 5)) \
--min-worker-port=$((BASE + 1000 + 100 * $1)) --max-worker-port=$((BASE + 1099 + 100 * $1))"
}

case "${1:-}" in
  start)
    workers=${2:-1}
    mkdir -p "$DIR"
    if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] \
        && [ ! -s "$HOME/.ray/auth_token" ]; then
      ray get-auth-token --generate > /dev/null  # ~/.ray/auth_token, for this machine's clusters
    fi
    # shellcheck disable=SC2046
    ray start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus="$CPUS" \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD" --temp-dir="$DIR" \
      --disable-usage-stats $(node_ports 0) > "$DIR/head.log" 2>&1 \
      || { cat "$DIR/head.log" >&2; exit 1; }
    for i in $(seq 1 "$workers"); do
      # shellcheck disable=SC2046
      ray start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus="$CPUS" \
        --disable-usage-stats $(node_ports "$i") > "$DIR/worker-$i.log" 2>&1 \
        || { cat "$DIR/worker-$i.log" >&2; exit 1; }
    done
    for _ in $(seq 1 150); do  # until every node has registered with the head
      nodes=$(ray status --address="127.0.0.1:$PORT" 2> /dev/null | grep -c " node_" || true)
      [ "$nodes" -ge $((workers + 1)) ] && break; sleep 0.2
    done
    echo "cluster at 127.0.0.1:$PORT (dashboard and jobs: http://127.0.0.1:$DASHBOARD), $((workers + 1)) nodes"
    ;;
  stop)
    # the cluster's GCS and raylets have its session folder (under $DIR) on their command
    # line; everything else of the cluster (agents, workers) descends from them (agents
    # rename themselves, so they are found as descendants, before anything is killed)
    pids=""
    descend() { local p; for p in $(pgrep -P "$1" || true); do pids="$pids $p"; descend "$p"; done; }
    for root in $(pgrep -f -- "$DIR/session" || true); do pids="$pids $root"; descend "$root"; done
    if [ -n "$pids" ]; then
      # shellcheck disable=SC2086
      kill $pids 2> /dev/null || true
      for _ in $(seq 1 50); do
        alive=""; for p in $pids; do kill -0 "$p" 2> /dev/null && alive="$alive $p"; done
        [ -z "$alive" ] && break; sleep 0.2
      done
      # shellcheck disable=SC2086
      [ -n "${alive:-}" ] && kill -9 $alive 2> /dev/null || true
    fi
    echo "stopped the cluster under $DIR ($(echo $pids | wc -w) processes)"
    ;;
  status)
    ray status --address="127.0.0.1:$PORT"
    ;;
  *)
    echo "usage: $0 start [N] | stop | status" >&2
    exit 2
    ;;
esac
