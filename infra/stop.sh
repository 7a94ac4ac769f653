#!/usr/bin/env bash
# Stop the local services recorded in the state dir (by their own pids, not by name).
# Usage: infra/stop.sh [--only seaweedfs,prefect,worker] [--state-dir DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
cd "$ROOT"
exec "$PY" -m infra stop "$@"
