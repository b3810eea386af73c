#!/usr/bin/env bash
# The whole stack on one machine, listening on loopback only:
#   prefect-server  Prefect API + UI            http://127.0.0.1:4200      (health: /api/health)
#   prefect-worker  process worker, pool alexnet-pool                      (health: :4201/health + ONLINE in the API)
#   mlflow          MLflow tracking, SQLite     http://127.0.0.1:5000      (health: /health)
#   ray-head        Ray head, token auth ON     GCS 127.0.0.1:6379, dashboard http://127.0.0.1:8265 (ray status)
#
#   infra/local/stack.sh start|stop|status [--dir DIR] [--ray-stop]
#
# Each service's pid and log are DIR/<service>.pid and DIR/<service>.log (DIR defaults to runs/stack in the
# repository). Prefect keeps its database and profiles in DIR/prefect (an isolated PREFECT_HOME), MLflow in
# DIR/mlflow. `start` waits until every service answers its health check (STACK_TIMEOUT seconds each, default 180)
# and stops what it started if one does not; it leaves running services alone, so it is safe to rerun.
# `stop` stops exactly the processes it started, by pid (process groups), never by name. `ray stop` kills every
# Ray process of this user on the machine (other `ray.init()` clusters and test runs included), so it runs only
# with --ray-stop. Ray's own session logs stay in its temp dir (linked as DIR/ray-temp). `status` reports each service and exits non-zero unless all are healthy.
#
# Ports (environment, read by `start`; `status`/`stop` reuse what `start` recorded in DIR/stack.env):
#   STACK_PREFECT_PORT=4200 STACK_WORKER_HEALTH_PORT=4201 STACK_MLFLOW_PORT=5000 STACK_RAY_PORT=6379
#   STACK_RAY_DASHBOARD_PORT=8265 STACK_RAY_CLIENT_PORT=10001 STACK_RAY_AGENT_PORT=52365
#   STACK_RAY_TEMP_DIR (default /tmp/alexnet-ray-<uid>-<hash of DIR>), STACK_RAY_ARGS (extra `ray start` args)
# Ray token: RAY_AUTH_TOKEN if set, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; a missing file is
# created with a new random token (what `ray get-auth-token --generate` does).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SERVICES=(prefect-server prefect-worker mlflow ray-head)
POOL=alexnet-pool
WORKER_NAME=alexnet-local
HOST=127.0.0.1

usage() { sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "stack.sh: $*" >&2; exit 1; }

ACTION=${1:-}
[ $# -gt 0 ] && shift
DIR="$ROOT/runs/stack"
RAY_STOP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) [ $# -ge 2 ] || die "--dir needs a value"; DIR=$2; shift 2 ;;
    --dir=*) DIR=${1#--dir=}; shift ;;
    --ray-stop) RAY_STOP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
case "$ACTION" in
  start|stop|status) ;;
  -h|--help|help) usage; exit 0 ;;
  *) usage >&2; die "expected start, stop or status, not '${ACTION}'" ;;
esac
if [ "$ACTION" = start ]; then
  mkdir -p "$DIR" || die "cannot create $DIR"
fi
if [ -d "$DIR" ]; then DIR=$(cd "$DIR" && pwd); else DIR=$(realpath -m "$DIR" 2>/dev/null || echo "$DIR"); fi

# --- tools --------------------------------------------------------------------------------------------------------

tool() {  # the venv's binary when present (the pinned versions), else PATH
  if [ -x "$ROOT/.venv/bin/$1" ]; then echo "$ROOT/.venv/bin/$1"; else command -v "$1" || true; fi
}
# Services inherit this PATH: a job's `python -m alexnet.train` (ray job submit) and flow runs must find the
# venv's python, not the system's.
[ -x "$ROOT/.venv/bin/python" ] && export PATH="$ROOT/.venv/bin:$PATH"
PY=$(tool python); [ -n "$PY" ] || PY=$(command -v python3 || true)
[ -n "$PY" ] || die "no python found (run 'make setup')"
PREFECT=$(tool prefect)
RAY=$(tool ray)
# shellcheck disable=SC2034  # read through ${!t} in do_start; infra/mlflow/server.sh finds mlflow the same way
MLFLOW=$(tool mlflow)

http_get() {  # http_get URL [HEADER]: prints the body, returns 0 on HTTP 2xx
  local url=$1 header=${2:-}
  if command -v curl >/dev/null 2>&1; then
    if [ -n "$header" ]; then curl -fsS --max-time 5 -H "$header" "$url" 2>/dev/null
    else curl -fsS --max-time 5 "$url" 2>/dev/null; fi
  else
    "$PY" - "$url" "$header" <<'PYEOF' 2>/dev/null
import sys, urllib.request
req = urllib.request.Request(sys.argv[1])
if sys.argv[2]:
    k, v = sys.argv[2].split(":", 1); req.add_header(k.strip(), v.strip())
sys.stdout.write(urllib.request.urlopen(req, timeout=5).read().decode())
PYEOF
  fi
}

http_status() {  # http_status URL: the HTTP status code (000 when nothing answers)
  if command -v curl >/dev/null 2>&1; then
    curl -s -o /dev/null --max-time 5 -w '%{http_code}' "$1" 2>/dev/null || true
  else
    "$PY" - "$1" <<'PYEOF' 2>/dev/null || echo 000
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).status, end="")
except urllib.error.HTTPError as e:
    print(e.code, end="")
PYEOF
  fi
}

port_free() {
  "$PY" -c 'import socket,sys
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try: s.bind((sys.argv[1], int(sys.argv[2])))
except OSError: sys.exit(1)' "$HOST" "$1"
}

pattern_of() {  # a word the service's command line must contain: guards against a recycled pid
  case "$1" in prefect-*) echo prefect ;; mlflow) echo mlflow ;; ray-head) echo ray ;; esac
}

pid_of() {  # prints the pid of a running service, or fails
  local f="$DIR/$1.pid" pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  ps -o args= -p "$pid" 2>/dev/null | grep -qF "$(pattern_of "$1")" || return 1
  echo "$pid"
}

# --- configuration ------------------------------------------------------------------------------------------------

ENV_FILE="$DIR/stack.env"
any_running() { local n; for n in "${SERVICES[@]}"; do pid_of "$n" >/dev/null && return 0; done; return 1; }
if [ -f "$ENV_FILE" ] && { [ "$ACTION" != start ] || any_running; }; then
  # shellcheck disable=SC1090
  . "$ENV_FILE"
else
  PREFECT_PORT=${STACK_PREFECT_PORT:-4200}
  WORKER_HEALTH_PORT=${STACK_WORKER_HEALTH_PORT:-4201}
  MLFLOW_PORT=${STACK_MLFLOW_PORT:-5000}
  RAY_PORT=${STACK_RAY_PORT:-6379}
  RAY_DASHBOARD_PORT=${STACK_RAY_DASHBOARD_PORT:-8265}
  RAY_CLIENT_PORT=${STACK_RAY_CLIENT_PORT:-10001}
  RAY_AGENT_PORT=${STACK_RAY_AGENT_PORT:-52365}
  # Ray records "the latest cluster" in its temp dir; a private one keeps a plain `ray.init()` elsewhere on this
  # machine (the test suite's, for one) from attaching to this head. Short, because Ray's socket paths live there.
  RAY_TEMP_DIR=${STACK_RAY_TEMP_DIR:-/tmp/alexnet-ray-$(id -u)-$(printf '%s' "$DIR" | cksum | cut -d' ' -f1)}
  if [ -n "${RAY_AUTH_TOKEN:-}" ]; then TOKEN_FILE=""; else TOKEN_FILE=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}; fi
fi
PREFECT_HOME_DIR="$DIR/prefect"
PREFECT_API="http://$HOST:$PREFECT_PORT/api"
MLFLOW_URI="http://$HOST:$MLFLOW_PORT"
DASHBOARD="http://$HOST:$RAY_DASHBOARD_PORT"

ray_token() { if [ -n "${TOKEN_FILE:-}" ]; then cat "$TOKEN_FILE" 2>/dev/null; else printf '%s' "${RAY_AUTH_TOKEN:-}"; fi; }

# The environment every Ray client of this head needs (RAY_AUTH_TOKEN, when used, is inherited as it is).
RAY_ENV=(RAY_AUTH_MODE=token)
[ -n "${TOKEN_FILE:-}" ] && RAY_ENV+=("RAY_AUTH_TOKEN_PATH=$TOKEN_FILE")

# --- processes ----------------------------------------------------------------------------------------------------

launch() {  # launch NAME CMD...: in its own session and process group, so `stop` can end all its children
  local name=$1; shift
  local setsid_cmd=()
  command -v setsid >/dev/null 2>&1 && setsid_cmd=(setsid)
  (cd "$ROOT" && exec "${setsid_cmd[@]}" "$@") >"$DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/$name.pid"
}

group_alive() { ps -eo pgid= | awk -v g="$1" '$1 == g { found = 1 } END { exit !found }'; }

wait_gone() {  # wait_gone PID SECONDS [group]
  local pid=$1 t=$2 kind=${3:-}
  for ((i = 0; i < t * 5; i++)); do
    if [ "$kind" = group ]; then group_alive "$pid" || return 0; else kill -0 "$pid" 2>/dev/null || return 0; fi
    sleep 0.2
  done
  return 1
}

stop_service() {
  local name=$1 pid pgid
  if ! pid=$(pid_of "$name"); then
    rm -f "$DIR/$name.pid"
    echo "  $name: not running"
    return 0
  fi
  local started=$SECONDS
  pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')
  # The leader first, so it can shut its children down in order (ray start --block drains the node), then
  # whatever is left of its process group.
  kill -TERM "$pid" 2>/dev/null || true
  wait_gone "$pid" 30 || kill -KILL "$pid" 2>/dev/null || true
  if [ "$pgid" = "$pid" ] && group_alive "$pid"; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    wait_gone "$pid" 10 group || kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$DIR/$name.pid"
  echo "  $name: stopped (pid $pid, $((SECONDS - started)) s)"
}

# --- health checks (each returns 0 when the service answers) -------------------------------------------------------

check_prefect-server() { [ "$(http_get "$PREFECT_API/health")" = true ]; }

check_prefect-worker() {
  http_get "http://$HOST:$WORKER_HEALTH_PORT/health" >/dev/null || return 1
  # The health server answers from the start; being ONLINE in the API proves the worker reached the server.
  "$PY" - "$PREFECT_API/work_pools/$POOL/workers/filter" "$WORKER_NAME" <<'PYEOF' 2>/dev/null
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1], data=b"{}", headers={"Content-Type": "application/json"}, method="POST")
workers = json.load(urllib.request.urlopen(req, timeout=5))
sys.exit(0 if any(w.get("name") == sys.argv[2] and w.get("status") == "ONLINE" for w in workers) else 1)
PYEOF
}

check_mlflow() { [ "$(http_get "$MLFLOW_URI/health")" = OK ]; }

check_ray-head() {
  local token
  token=$(ray_token) || return 1
  http_get "$DASHBOARD/api/version" "Authorization: Bearer $token" >/dev/null || return 1
  env "${RAY_ENV[@]}" "$RAY" status --address "$HOST:$RAY_PORT" >/dev/null 2>&1
}

ray_auth_enforced() { [ "$(http_status "$DASHBOARD/api/version")" = 401 ]; }

wait_healthy() {  # wait_healthy NAME: until healthy, the process exits, or STACK_TIMEOUT
  local name=$1 timeout=${STACK_TIMEOUT:-180} started=$SECONDS
  while :; do
    if ! pid_of "$name" >/dev/null; then
      echo "stack.sh: $name exited during startup; last lines of $DIR/$name.log:" >&2
      tail -n 25 "$DIR/$name.log" >&2 2>/dev/null
      return 1
    fi
    if "check_$name"; then
      echo "  $name: healthy after $((SECONDS - started)) s"
      return 0
    fi
    if ((SECONDS - started >= timeout)); then
      echo "stack.sh: $name did not answer its health check within $timeout s (STACK_TIMEOUT); last lines of $DIR/$name.log:" >&2
      tail -n 25 "$DIR/$name.log" >&2 2>/dev/null
      return 1
    fi
    sleep 1
  done
}

# --- actions ------------------------------------------------------------------------------------------------------

do_stop() {
  echo "stack.sh: stopping the stack in $DIR"
  for name in prefect-worker prefect-server mlflow ray-head; do stop_service "$name"; done
  if [ "$RAY_STOP" = 1 ]; then
    echo "  ray stop (every Ray process of this user on this machine):"
    "$RAY" stop || true
  fi
}

ensure_token() {
  [ -z "${TOKEN_FILE:-}" ] && return 0
  if [ ! -s "$TOKEN_FILE" ]; then
    mkdir -p "$(dirname "$TOKEN_FILE")" || die "cannot create $(dirname "$TOKEN_FILE")"
    (umask 077 && "$PY" -c 'import secrets,sys; open(sys.argv[1],"w").write(secrets.token_hex(32))' "$TOKEN_FILE") \
      || die "cannot write the Ray token to $TOKEN_FILE"
    echo "  ray-head: created a new auth token in $TOKEN_FILE"
  fi
}

start_failed() {
  echo "stack.sh: start failed; stopping what this run started" >&2
  for name in "${STARTED[@]}"; do stop_service "$name" >&2; done
  exit 1
}

do_start() {
  for t in PREFECT RAY MLFLOW; do
    [ -n "${!t}" ] || die "$(echo "$t" | tr '[:upper:]' '[:lower:]') not found: run 'make setup' (uses .venv/bin) or put it on PATH"
  done
  echo "stack.sh: starting the stack in $DIR"
  STARTED=()
  local -A port_of=([prefect-server]="$PREFECT_PORT" [prefect-worker]="$WORKER_HEALTH_PORT" [mlflow]="$MLFLOW_PORT"
                    [ray-head]="$RAY_PORT $RAY_DASHBOARD_PORT $RAY_CLIENT_PORT $RAY_AGENT_PORT")
  local todo=()
  for name in "${SERVICES[@]}"; do
    if pid_of "$name" >/dev/null; then
      echo "  $name: already running (pid $(pid_of "$name"))"
      continue
    fi
    for p in ${port_of[$name]}; do
      port_free "$p" || die "$name: port $HOST:$p is in use (another instance? choose another with the STACK_*_PORT variables)"
    done
    todo+=("$name")
  done
  {
    echo "# written by infra/local/stack.sh start; read by status and stop"
    for v in PREFECT_PORT WORKER_HEALTH_PORT MLFLOW_PORT RAY_PORT RAY_DASHBOARD_PORT RAY_CLIENT_PORT RAY_AGENT_PORT \
             RAY_TEMP_DIR TOKEN_FILE; do
      printf '%s=%q\n' "$v" "${!v:-}"
    done
  } >"$ENV_FILE"
  want() { local n; for n in "${todo[@]}"; do [ "$n" = "$1" ] && return 0; done; return 1; }
  local prefect_env=(env -u PREFECT_API_URL -u PREFECT_API_KEY -u PREFECT_SERVER_DATABASE_CONNECTION_URL
                     -u PREFECT_API_DATABASE_CONNECTION_URL PREFECT_HOME="$PREFECT_HOME_DIR"
                     PREFECT_SERVER_ANALYTICS_ENABLED=false)
  mkdir -p "$PREFECT_HOME_DIR"

  # The three servers start together (each takes seconds of CPU); the worker needs the Prefect API first.
  if want prefect-server; then
    launch prefect-server "${prefect_env[@]}" "$PREFECT" server start --host "$HOST" --port "$PREFECT_PORT" \
      --no-background
    STARTED+=(prefect-server)
  fi
  if want mlflow; then
    launch mlflow bash "$ROOT/infra/mlflow/server.sh" --dir "$DIR/mlflow" --host "$HOST" --port "$MLFLOW_PORT"
    STARTED+=(mlflow)
  fi
  if want ray-head; then
    ensure_token
    mkdir -p "$RAY_TEMP_DIR" && ln -sfn "$RAY_TEMP_DIR" "$DIR/ray-temp"
    # --block keeps `ray start` in the foreground as the owner of the node's processes: stopping its pid shuts
    # the node down (its own SIGTERM handler), with no machine-wide `ray stop`.
    # shellcheck disable=SC2086
    launch ray-head env "${RAY_ENV[@]}" "$RAY" start --head --block --disable-usage-stats \
      --node-ip-address="$HOST" --port="$RAY_PORT" \
      --dashboard-host="$HOST" --dashboard-port="$RAY_DASHBOARD_PORT" \
      --ray-client-server-port="$RAY_CLIENT_PORT" --dashboard-agent-listen-port="$RAY_AGENT_PORT" \
      --temp-dir="$RAY_TEMP_DIR" ${STACK_RAY_ARGS:-}
    STARTED+=(ray-head)
  fi

  if want prefect-server || want prefect-worker; then wait_healthy prefect-server || start_failed; fi
  if want prefect-worker; then
    if ! env PREFECT_HOME="$PREFECT_HOME_DIR" PREFECT_API_URL="$PREFECT_API" \
         "$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1; then
      env PREFECT_HOME="$PREFECT_HOME_DIR" PREFECT_API_URL="$PREFECT_API" \
        "$PREFECT" work-pool create "$POOL" --type process >"$DIR/prefect-pool.log" 2>&1 \
        || { cat "$DIR/prefect-pool.log" >&2; echo "stack.sh: could not create work pool $POOL" >&2; start_failed; }
      echo "  prefect-worker: created work pool $POOL (process)"
    fi
    # Flow runs inherit this environment: they log to this MLflow and run their Ray work on this head.
    launch prefect-worker "${prefect_env[@]}" PREFECT_API_URL="$PREFECT_API" \
      PREFECT_WORKER_WEBSERVER_HOST="$HOST" PREFECT_WORKER_WEBSERVER_PORT="$WORKER_HEALTH_PORT" \
      MLFLOW_TRACKING_URI="$MLFLOW_URI" RAY_ADDRESS="$HOST:$RAY_PORT" "${RAY_ENV[@]}" \
      "$PREFECT" worker start --pool "$POOL" --type process --name "$WORKER_NAME" --with-healthcheck \
      --install-policy never
    STARTED+=(prefect-worker)
  fi
  if want mlflow; then wait_healthy mlflow || start_failed; fi
  if want ray-head; then
    wait_healthy ray-head || start_failed
    ray_auth_enforced || { echo "stack.sh: the Ray dashboard answers without a token: token auth is OFF" >&2; start_failed; }
  fi
  if want prefect-worker; then wait_healthy prefect-worker || start_failed; fi

  # shellcheck disable=SC2016  # printed for the user's shell to expand
  local token_hint='export RAY_AUTH_TOKEN=$(ray get-auth-token)   # from ~/.ray/auth_token'
  [ -n "${TOKEN_FILE:-}" ] && [ "$TOKEN_FILE" != "$HOME/.ray/auth_token" ] && token_hint="export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"
  [ -z "${TOKEN_FILE:-}" ] && token_hint='# RAY_AUTH_TOKEN is already set in this shell'
  cat <<EOF
stack.sh: the stack is up (logs and pids in $DIR)
  Prefect UI/API  http://$HOST:$PREFECT_PORT   work pool $POOL, worker $WORKER_NAME
  MLflow          $MLFLOW_URI
  Ray dashboard   $DASHBOARD   GCS $HOST:$RAY_PORT   (token authentication on)
Clients:
  export PREFECT_API_URL=$PREFECT_API
  export MLFLOW_TRACKING_URI=$MLFLOW_URI
  export RAY_ADDRESS=$DASHBOARD RAY_AUTH_MODE=token   # jobs: ray job submit/status/logs
  $token_hint
  # the job runs in an uploaded copy of the repository: give it absolute paths (runs/ is not uploaded)
  ray job submit --working-dir . -- python -m alexnet.train --config configs/smoke.yaml \\
      --data $ROOT/runs/smoke/prepared --set train.storage_path=$ROOT/runs/ray
  # drivers (ray.init, alexnet ... --ray-address): RAY_ADDRESS=$HOST:$RAY_PORT with the same RAY_AUTH_* variables
Stop with: infra/local/stack.sh stop${DIR:+ --dir $DIR}
EOF
}

do_status() {
  local all=0 pid detail
  echo "stack.sh: status of the stack in $DIR"
  for name in "${SERVICES[@]}"; do
    case "$name" in
      prefect-server) detail="$PREFECT_API/health" ;;
      prefect-worker) detail="pool $POOL, http://$HOST:$WORKER_HEALTH_PORT/health" ;;
      mlflow) detail="$MLFLOW_URI/health" ;;
      ray-head) detail="$DASHBOARD, GCS $HOST:$RAY_PORT" ;;
    esac
    if ! pid=$(pid_of "$name"); then
      echo "  $name: stopped"; all=1
    elif "check_$name"; then
      if [ "$name" = ray-head ]; then
        if ray_auth_enforced; then detail="$detail, token auth on"; else detail="$detail, token auth OFF"; all=1; fi
      fi
      echo "  $name: healthy (pid $pid; $detail)"
    else
      echo "  $name: running (pid $pid) but NOT answering ($detail; see $DIR/$name.log)"; all=1
    fi
  done
  return $all
}

case "$ACTION" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
esac
