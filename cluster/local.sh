#!/usr/bin/env bash
# A Ray cluster on this machine: a head plus N worker nodes with explicit memory and object-store sizes
# (each node would otherwise claim the whole machine). Stops only the processes it started.
#
#   cluster/local.sh up 2      # head + 2 workers; prints the address to use
#   RAY_ADDRESS=$(cat "$STATE/address") dreamstereo generate ...
#   cluster/local.sh down
set -euo pipefail
STATE=${DREAMSTEREO_LOCAL_RAY:-/tmp/dreamstereo-local-ray}
RAY=${RAY_BIN:-ray}
NODE_CPUS=${NODE_CPUS:-1}
NODE_MEMORY=${NODE_MEMORY:-$((3 * 1024 * 1024 * 1024))}        # bytes per node
NODE_OBJECT_STORE=${NODE_OBJECT_STORE:-$((512 * 1024 * 1024))}  # bytes per node
PORT=${RAY_PORT:-6399}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

up() {
  local workers=${1:-1}
  if [ -f "$STATE/address" ] || [ -s "$STATE/pgids" ]; then
    echo "a cluster (or a failed start) is recorded in $STATE: run $0 down first" >&2; exit 1
  fi
  mkdir -p "$STATE/tmp"
  : >"$STATE/pgids"
  trap 'echo "start failed: stopping what was started" >&2; down; exit 1' ERR
  # Each `ray start` runs as the leader of its own session, so every daemon it leaves behind stays in
  # that process group: `down` signals exactly these groups and nothing else on the machine.
  start_node "$STATE/head.log" --head --port="$PORT" --temp-dir="$STATE/tmp" --include-dashboard=false
  local address="127.0.0.1:$PORT"
  for i in $(seq 1 "$workers"); do
    start_node "$STATE/worker-$i.log" --address="$address"
  done
  trap - ERR
  echo "$address" >"$STATE/address"
  echo "$address"
}

start_node() {
  local log=$1
  shift
  setsid bash -c 'echo $$ >>"$0"; exec "$@"' "$STATE/pgids" "$RAY" start "$@" --num-cpus="$NODE_CPUS" \
    --memory="$NODE_MEMORY" --object-store-memory="$NODE_OBJECT_STORE" --disable-usage-stats >"$log" 2>&1
}

down() {
  [ -f "$STATE/pgids" ] || { rm -f "$STATE/address"; return 0; }
  local groups
  groups=$(sed 's/^/-/' "$STATE/pgids" | tr '\n' ' ')
  kill -TERM -- $groups 2>/dev/null || true
  for _ in $(seq 1 50); do
    alive=0
    for g in $(cat "$STATE/pgids"); do pgrep -g "$g" >/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  kill -KILL -- $groups 2>/dev/null || true
  rm -f "$STATE/address" "$STATE/pgids"
}

case "${1:-}" in
  up) up "${2:-1}" ;;
  down) down ;;
  *) echo "usage: $0 up N | down" >&2; exit 2 ;;
esac
