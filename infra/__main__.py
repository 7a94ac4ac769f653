"""CLI: ``python -m infra {start,stop,status,env} [options]``.

``env`` prints ``export`` lines for the running services; the S3 secret is read from its 0600
file by the shell (``$(cat ...)``), never printed.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from infra.prefect_server import PREFECT_SERVER, running_prefect_server
from infra.prefect_worker import DEFAULT_POOL
from infra.processes import STATE_DIR_ENV, ServiceError, stop_service
from infra.seaweedfs import SEAWEEDFS, running_s3
from infra.stack import service_names, start_all, status


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infra", description=__doc__)
    p.add_argument("command", choices=["start", "stop", "status", "env"])
    p.add_argument("--state-dir", default=None, help=f"default ${STATE_DIR_ENV} or .data/infra")
    p.add_argument(
        "--only",
        default="seaweedfs,prefect,worker",
        help="comma list of services for start/stop: seaweedfs, prefect, worker",
    )
    p.add_argument("--s3-port", type=int, default=None)
    p.add_argument("--prefect-port", type=int, default=None)
    p.add_argument("--pool", default=DEFAULT_POOL)
    p.add_argument("--no-ui", action="store_true", help="start the Prefect server without its UI")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - {"seaweedfs", "prefect", "worker"}
    if unknown:
        print(f"unknown service(s) in --only: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    state = args.state_dir
    try:
        if args.command == "start":
            stack = start_all(
                state,
                s3_port=args.s3_port,
                prefect_port=args.prefect_port,
                pool=args.pool,
                seaweedfs="seaweedfs" in only,
                prefect="prefect" in only,
                worker="worker" in only,
                ui=not args.no_ui,
            )
            if stack.s3:
                print(f"seaweedfs       pid {stack.s3.pid:<8} {stack.s3.endpoint_url}")
            if stack.server:
                print(f"prefect-server  pid {stack.server.pid:<8} {stack.server.api_url}")
            if stack.worker:
                print(f"worker          pid {stack.worker.pid:<8} pool {stack.worker.pool}")
        elif args.command == "stop":
            names = service_names(state)
            wanted = [
                n
                for n in names
                if (n == SEAWEEDFS and "seaweedfs" in only)
                or (n == PREFECT_SERVER and "prefect" in only)
                or (n.startswith("worker-") and ("worker" in only or "prefect" in only))
            ]
            for name in wanted:
                stopped = stop_service(name, state)
                print(f"{name}: {'stopped' if stopped else 'was not running'}")
        elif args.command == "status":
            rows = status(state)
            if not rows:
                print("no services recorded")
            for st in rows.values():
                state_word = "healthy" if st.healthy else ("running" if st.running else "dead")
                print(f"{st.name:<24} pid {st.pid!s:<8} {state_word:<8} {st.url or ''}  {st.log}")
        else:
            s3 = running_s3(state)
            server = running_prefect_server(state)
            if s3 is not None:
                secret_file = s3.state_dir / "secrets" / "s3_secret_key"
                print(f"export AWS_ENDPOINT_URL={shlex.quote(s3.endpoint_url)}")
                print(f"export AWS_ACCESS_KEY_ID={shlex.quote(s3.access_key)}")
                print(f'export AWS_SECRET_ACCESS_KEY="$(cat {shlex.quote(str(secret_file))})"')
            if server is not None:
                for k, v in server.env().items():
                    print(f"export {k}={shlex.quote(v)}")
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
