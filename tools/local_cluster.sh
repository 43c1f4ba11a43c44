#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine: a head and N worker nodes started with
# `ray start` on loopback, each with its own ports; `stop` stops exactly the processes this
# script started (everything under its temporary folder, the head's Ray client server on
# its own port, and their descendants), never other Ray instances.
#
#   tools/local_cluster.sh start 2          # head + 2 worker nodes, 1 CPU each
#   tools/local_cluster.sh add              # one more worker node (the lowest free index:
#                                           # puts back a node that was killed)
#   tools/local_cluster.sh status
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8275 -- \
#       raymeta sweep "$PWD/sweeps/quickstart.yaml" --address auto   # no --working-dir: docs/clusters.md
#   tools/local_cluster.sh stop
#
# Settings (environment): RAYMETA_CLUSTER_DIR (/tmp/rmcluster), RAYMETA_CLUSTER_PORT (6390),
# RAYMETA_DASHBOARD_PORT (8275), RAYMETA_CPUS_PER_NODE (1), RAYMETA_PORT_BASE (24000; node i
# uses BASE+10i..BASE+10i+5, the head's Ray client server BASE+9, workers BASE+1000+100i..+99).
# Token authentication is on (Ray's default since 2.59): every shell that talks to the
# cluster needs RAY_AUTH_MODE=token; the token is ~/.ray/auth_token (or RAY_AUTH_TOKEN /
# RAY_AUTH_TOKEN_PATH), generated here if missing, mode 600: keep it out of logs and git.
set -euo pipefail

DIR=${RAYMETA_CLUSTER_DIR:-/tmp/rmcluster}
PORT=${RAYMETA_CLUSTER_PORT:-6390}
DASHBOARD=${RAYMETA_DASHBOARD_PORT:-8275}
CPUS=${RAYMETA_CPUS_PER_NODE:-1}
BASE=${RAYMETA_PORT_BASE:-24000}
CLIENT=$((BASE + 9))  # the head's Ray client server (Ray's default 10001 collides across clusters)
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0

node_ports() {  # distinct agent ports per node, so nodes on one machine never collide
  local b=$((BASE + 10 * $1))
  echo "--node-manager-port=$b --object-manager-port=$((b + 1)) \
--dashboard-agent-listen-port=$((b + 2)) --dashboard-agent-grpc-port=$((b + 3)) \
--runtime-env-agent-port=$((b + 4)) --metrics-export-port=$((b + 5)) \
--min-worker-port=$((BASE + 1000 + 100 * $1)) --max-worker-port=$((BASE + 1099 + 100 * $1))"
}

node_alive() {  # is worker node $1 of this cluster running (its raylet, by its port)?
  pgrep -f -- "raylet --raylet_socket_name=$DIR/session.* --node_manager_port=$((BASE + 10 * $1)) " \
    > /dev/null
}

start_worker() {  # worker node $1 joins the head
  # shellcheck disable=SC2046
  ray start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus="$CPUS" \
    --disable-usage-stats $(node_ports "$1") > "$DIR/worker-$1.log" 2>&1 \
    || { cat "$DIR/worker-$1.log" >&2; exit 1; }
}

live_nodes() {  # nodes `ray status` lists as active or idle (not its "Recent failures")
  { ray status --address="127.0.0.1:$PORT" 2> /dev/null || true; } \
    | awk '/^Pending:/ {exit} / node_/ {n++} END {print n + 0}'
}

wait_nodes() {  # until $1 nodes have registered with the head (at most 60 s, then an error)
  for _ in $(seq 1 300); do
    [ "$(live_nodes)" -ge "$1" ] && return 0; sleep 0.2
  done
  echo "only $(live_nodes) of $1 nodes registered with 127.0.0.1:$PORT within 60 s; see $DIR/*.log" >&2
  return 1
}

case "${1:-}" in
  start)
    workers=${2:-1}
    mkdir -p "$DIR"
    if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] \
        && [ ! -s "$HOME/.ray/auth_token" ]; then
      # ~/.ray/auth_token, for this machine's clusters. The token is a password and Ray
      # writes it world-readable (644), which rsync/cp -p then copy along: owner-only
      (umask 077 && ray get-auth-token --generate > /dev/null)
      chmod 600 "$HOME/.ray/auth_token"
    fi
    token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
    if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -f "$token_file" ] \
        && [ "$(stat -c %a "$token_file")" != 600 ]; then
      echo "warning: $token_file is mode $(stat -c %a "$token_file"): chmod 600 it" >&2
    fi
    # shellcheck disable=SC2046
    ray start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus="$CPUS" \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD" --temp-dir="$DIR" \
      --ray-client-server-port="$CLIENT" \
      --disable-usage-stats $(node_ports 0) > "$DIR/head.log" 2>&1 \
      || { cat "$DIR/head.log" >&2; exit 1; }
    for i in $(seq 1 "$workers"); do start_worker "$i"; done
    wait_nodes $((workers + 1))
    echo "cluster at 127.0.0.1:$PORT (dashboard and jobs: http://127.0.0.1:$DASHBOARD), $((workers + 1)) nodes"
    ;;
  add)
    # one more worker node at the lowest index whose node is not running (a killed node's
    # index and ports are free again, so this puts it back)
    ray status --address="127.0.0.1:$PORT" > /dev/null 2>&1 \
      || { echo "no cluster at 127.0.0.1:$PORT (start it first)" >&2; exit 1; }
    i=1; while node_alive "$i"; do i=$((i + 1)); done
    start_worker "$i"
    # until every running raylet of this cluster has registered (a killed node may still be
    # listed for a few seconds, so this counts raylets rather than adding one to the list)
    wait_nodes "$(pgrep -fc -- "raylet --raylet_socket_name=$DIR/session" || true)"
    echo "worker node $i joined 127.0.0.1:$PORT"
    ;;
  stop)
    # roots: the cluster's GCS, raylets, dashboard, monitors (its folder $DIR on their
    # command line) and the head's Ray client server (no $DIR on its command line, parent 1:
    # found by its own port and the cluster's GCS port); everything else of the cluster
    # (agents, workers) descends from them (agents rename themselves, so they are found as
    # descendants, before anything is killed)
    pids=""
    descend() { local p; for p in $(pgrep -P "$1" || true); do pids="$pids $p"; descend "$p"; done; }
    client="ray\.util\.client\.server --address=[^ ]*:$PORT .*--port=$CLIENT( |$)"
    roots="$(pgrep -f -- "$DIR/session" || true) $(pgrep -f -- "--temp-dir=$DIR( |$)" || true)"
    roots="$roots $(pgrep -f -- "$client" || true)"
    for root in $(echo "$roots" | tr ' ' '\n' | sort -un); do
      pids="$pids $root"; descend "$root"
    done
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
    echo "usage: $0 start [N] | add | stop | status" >&2
    exit 2
    ;;
esac
