#!/usr/bin/env bash
# A one-machine MLflow tracking server: a SQLite store and a local artifact folder, bound to loopback.
#
#   infra/mlflow/server.sh [--dir DIR] [--port PORT] [--host HOST] [-- EXTRA_MLFLOW_SERVER_ARGS...]
#
# DIR (default runs/mlflow in the repository) holds mlflow.db and artifacts/. The server proxies artifacts
# (--serve-artifacts), so clients need only the tracking URI (http://127.0.0.1:PORT), not the folder: Ray workers
# on the same machine log through HTTP like a remote cluster would. infra/local/stack.sh runs this script; for a
# shared server (PostgreSQL + S3) see infra/mlflow/README.md. Runs in the foreground (exec), so a supervisor
# (stack.sh, systemd) owns the process.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DIR="$ROOT/runs/mlflow"
HOST=127.0.0.1
PORT=5000
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --host) HOST=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "server.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
# Another interface than loopback makes the server reachable from the network: only with MLflow's basic-auth app.
case "$HOST" in
  127.*|localhost|::1) ;;
  *) case " $* " in
       *" --app-name basic-auth "*|*" --app-name=basic-auth "*) ;;
       *) echo "server.sh: --host $HOST would serve MLflow to the network without authentication; add" \
            "'-- --app-name basic-auth' with MLFLOW_AUTH_ADMIN_PASSWORD and MLFLOW_FLASK_SERVER_SECRET_KEY set" \
            "(infra/mlflow/README.md), or keep the default 127.0.0.1" >&2
          exit 2 ;;
     esac ;;
esac
mkdir -p "$DIR/artifacts"
DIR=$(cd "$DIR" && pwd)
if [ -x "$ROOT/.venv/bin/mlflow" ]; then MLFLOW="$ROOT/.venv/bin/mlflow"; else MLFLOW=$(command -v mlflow || true); fi
if [ -z "$MLFLOW" ]; then echo "server.sh: mlflow not found (run 'make setup' or install mlflow)" >&2; exit 1; fi
# One worker process: a single-user server on a small machine; raise --workers for a busy shared one.
exec "$MLFLOW" server \
  --backend-store-uri "sqlite:///$DIR/mlflow.db" \
  --serve-artifacts --artifacts-destination "$DIR/artifacts" \
  --host "$HOST" --port "$PORT" --workers 1 "$@"
