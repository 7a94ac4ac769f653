"""The bank search's probe results kept per machine, beside the runtime calibrations.

``anomalydino_core.nn_search.choose_method`` times faiss against blocked torch (and bf16) once
per process and search shape: 0.8-1.5 s on the first chunk of every ``anomalydino audit``
(AMD EPYC, 2 vCPUs; ~10 ms per image of an 83-image EfficientNet-Lite0 lot). A scoring task
adopts the results that earlier processes measured on this machine
(``<cache>/runtimes/search-<digest>.json``; the key: CPU model and flags, torch and faiss
versions) and writes back what it measured itself. A missing or unreadable file only means
measuring again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
from pathlib import Path

import faiss
import torch

from anomalydino_core.nn_search import adopt_choices, known_choices
from tasks.machine import cache_root, cpu_identity, write_cache_json

log = logging.getLogger(__name__)
_saved: set[str] = set()
_lock = threading.Lock()


def machine_key() -> dict[str, object]:
    return {"cpu": cpu_identity(), "torch": torch.__version__, "faiss": faiss.__version__}


def choices_file() -> Path:
    key = json.dumps(machine_key(), sort_keys=True).encode()
    return cache_root() / "runtimes" / f"search-{hashlib.sha256(key).hexdigest()[:16]}.json"


@functools.cache
def load_search_choices() -> None:
    """Adopt this machine's stored probe results (once per process)."""
    path = choices_file()
    try:
        data = json.loads(path.read_text())
        if data.get("key") != json.loads(json.dumps(machine_key())):
            return
        adopt_choices(data["choices"])
        with _lock:
            _saved.update(data["choices"])
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("search probe cache %s unreadable, measuring again: %s", path, exc)


def save_search_choices() -> None:
    """Write this process's probe results back when it measured new ones (best effort)."""
    choices = known_choices()
    with _lock:
        if set(choices) <= _saved:
            return
        _saved.update(choices)
    path = choices_file()
    try:
        try:
            stored = json.loads(path.read_text()).get("choices", {})
        except (OSError, ValueError, AttributeError):
            stored = {}
        write_cache_json(path, {"key": machine_key(), "choices": {**stored, **choices}})
    except OSError as exc:
        log.warning("search probe cache %s not written: %s", path, exc)
