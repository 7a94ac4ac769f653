#!/usr/bin/env bash
# Start the local services (SeaweedFS, Prefect server, process worker) on 127.0.0.1.
# Usage: infra/start.sh [--only seaweedfs,prefect,worker] [--state-dir DIR] [--s3-port N] ...
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
cd "$ROOT"
exec "$PY" -m infra start "$@"
