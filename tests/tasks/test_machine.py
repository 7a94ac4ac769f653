"""tasks/machine.py: the CPU's identity and the machine cache's files."""

from __future__ import annotations

import json
import re

from tasks.machine import CPU_FLAGS, cache_root, cpu_identity, machine_name, write_cache_json

XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 avx512_fp16
processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
"""
EPYC = """model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu avx2 avx512f avx512_bf16
"""


def test_cpu_identity_is_the_model_name_and_the_flags_that_decide_runtimes():
    assert cpu_identity(XEON) == {
        "model_name": "Intel(R) Xeon(R) Processor",
        "flags": ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                  "amx_int8"],
    }  # fmt: skip
    assert cpu_identity(EPYC)["flags"] == ["avx2", "avx512f", "avx512_bf16"]
    assert cpu_identity("") == {"model_name": "unknown", "flags": []}
    assert set(cpu_identity()["flags"]) <= set(CPU_FLAGS)  # this machine's


def test_machine_name_is_a_short_file_safe_digest_of_this_cpu():
    name = machine_name()
    assert re.fullmatch(r"[0-9a-f]{16}", name) and name == machine_name()


def test_cache_root_follows_the_environment(tmp_path):
    assert cache_root({"ANOMALYDINO_CACHE": str(tmp_path)}) == tmp_path
    assert cache_root({}).parts[-2:] == (".cache", "anomalydino")


def test_cache_files_are_written_whole(tmp_path):
    path = tmp_path / "runtimes" / "choice.json"
    write_cache_json(path, {"choice": "openvino", "figures": [1.5]})
    write_cache_json(path, {"choice": "torch"})  # replaced, not appended
    assert json.loads(path.read_text()) == {"choice": "torch"}
    assert [p.name for p in path.parent.iterdir()] == ["choice.json"]  # no temporary left
