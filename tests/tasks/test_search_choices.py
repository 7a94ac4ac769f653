"""The bank search's probe results, kept per machine: adopted by the next process, written back
when new, ignored when they belong to another machine or cannot be read."""

from __future__ import annotations

import json

import pytest

from anomalydino_core import nn_search
from tasks import search_choices as sc


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A new process's state, with its own cache folder."""
    monkeypatch.setenv("ANOMALYDINO_CACHE", str(tmp_path))

    def reset() -> None:
        nn_search._CHOICES.clear()
        sc.load_search_choices.cache_clear()
        sc._saved.clear()

    reset()
    yield reset
    reset()


def test_a_measured_choice_is_written_and_adopted_by_the_next_process(fresh) -> None:
    measured = nn_search.choose_method(("faiss", "torch"), 64, 64, 512)
    assert set(measured.ms) == {"faiss", "torch"}  # really measured
    sc.save_search_choices()
    stored = json.loads(sc.choices_file().read_text())
    assert stored["key"]["cpu"] == sc.cpu_identity() and len(stored["choices"]) == 1
    fresh()  # the next process: nothing measured yet
    sc.load_search_choices()
    again = nn_search.choose_method(("faiss", "torch"), 64, 64, 512)
    assert again == measured  # the very figures: adopted, not measured again


def test_a_stored_choice_decides_and_other_machines_files_are_ignored(fresh) -> None:
    key = nn_search.probe_key(("faiss", "torch"), 48, 48, 700)
    path = sc.choices_file()
    path.parent.mkdir(parents=True)
    told = {key: {"method": "torch", "ms": {"faiss": 9.0, "torch": 1.0}}}
    path.write_text(json.dumps({"key": sc.machine_key(), "choices": told}))
    sc.load_search_choices()
    chosen = nn_search.choose_method(("faiss", "torch"), 48, 48, 700)
    assert chosen.method == "torch" and chosen.ms == {"faiss": 9.0, "torch": 1.0}
    fresh()
    other = {**sc.machine_key(), "torch": "0.0"}
    path.write_text(json.dumps({"key": other, "choices": told}))
    sc.load_search_choices()
    assert nn_search.choose_method(("faiss", "torch"), 48, 48, 700).ms != told[key]["ms"]


def test_an_unreadable_file_means_measuring_again(fresh, caplog) -> None:
    path = sc.choices_file()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    sc.load_search_choices()
    assert "unreadable, measuring again" in caplog.text
    assert set(nn_search.choose_method(("faiss", "torch"), 32, 32, 512).ms) == {"faiss", "torch"}
    sc.save_search_choices()  # and the file is good again
    assert len(json.loads(path.read_text())["choices"]) == 1
