"""Checks on real processes shared by the infra tests."""

from __future__ import annotations

import os

import psutil


def gone(pid: int) -> bool:
    """The process and its whole process group are gone (zombies count as gone)."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return not any(os.getpgid(p.pid) == pid for p in psutil.process_iter() if p.is_running())


def listen_addrs(pid: int) -> set[str]:
    """Addresses the process and its descendants listen on."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {
        c.laddr.ip for p in procs for c in p.net_connections(kind="inet") if c.status == "LISTEN"
    }
