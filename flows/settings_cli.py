"""Command-line flags and the settings table, generated from the one settings model.

Every field of ``PipelineConfig``'s sections (``flows/config.py``, ``anomalydino_core/config.py``)
becomes a flag named after it (``model.batch_size`` -> ``--batch-size``) with its type, choices,
description and default taken from the model: nothing is declared twice. A flag that is not
given leaves the config file / environment value in place (flags are overrides, see
``PipelineConfig.load``). ``settings_table`` renders the same fields as the docs table
(docs/settings.md, checked by a test).
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from flows.config import PipelineConfig

TOP_LEVEL = ("root", "incoming", "references")
PIPELINE_SECTIONS = ("model", "scoring", "foundad", "thresholds", "runtime", "storage")
#: sections whose flags carry the section's name (``foundad.max_epochs`` -> --foundad-max-epochs)
PREFIXED_SECTIONS = frozenset({"foundad"})


def section_model(section: str) -> type[BaseModel]:
    return PipelineConfig.model_fields[section].annotation  # type: ignore[return-value]


def _plain_type(annotation: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """(python type, choices) of a scalar annotation, ``X | None`` unwrapped; (None, None) for
    a field that is no command-line scalar (a mapping, a nested model)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _plain_type(inner[0]) if len(inner) == 1 else (None, None)
    if typing.get_origin(annotation) is Literal:
        return type(args[0]), args
    if typing.get_origin(annotation) is list and args and args[0] is str:
        return list, None
    if annotation in (str, int, float, bool):
        return annotation, None
    return None, None


def _default_text(field: FieldInfo) -> str:
    if field.default is not PydanticUndefined:
        return "none" if field.default is None else str(field.default)
    return "empty" if field.default_factory is not None else "required"


def flag_name(path: str) -> str:
    """``model.batch_size`` -> ``--batch-size``; ``foundad.top_k`` -> ``--foundad-top-k``."""
    section, _, name = path.rpartition(".")
    if section in PREFIXED_SECTIONS:
        name = f"{section}_{name}"
    return "--" + name.replace("_", "-")


def _fields(sections: tuple[str, ...], exclude: frozenset[str]):
    """(dotted path, field name, FieldInfo, python type, choices) of every command-line field."""
    for name in TOP_LEVEL:
        if name not in exclude:
            field = PipelineConfig.model_fields[name]
            yield name, name, field, str, None
    for section in sections:
        for name, field in section_model(section).model_fields.items():
            path = f"{section}.{name}"
            kind, choices = _plain_type(field.annotation)
            if kind is None or path in exclude or name in exclude:
                continue
            yield path, name, field, kind, choices


def add_settings_flags(
    parser: argparse.ArgumentParser,
    sections: tuple[str, ...] = PIPELINE_SECTIONS,
    *,
    exclude: frozenset[str] = frozenset(),
) -> None:
    """``--config`` and one flag per setting of ``sections``, each defaulting to "not given"."""
    parser.add_argument(
        "--config", default=None, help="YAML/JSON config file (else $ANOMALYDINO_CONFIG)"
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for path, name, field, kind, choices in _fields(sections, exclude):
        section = path.split(".")[0] if "." in path else "locations"
        if section not in groups:
            doc = (section_model(section).__doc__ or "") if section != "locations" else ""
            title = doc.strip().splitlines()[0] if doc.strip() else "where inputs and outputs live"
            groups[section] = parser.add_argument_group(f"{section}: {title.rstrip('.')}")
        help_text = f"{field.description or ''} (default: {_default_text(field)})".strip()
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        options: dict[str, Any] = dict(dest=path, default=argparse.SUPPRESS, help=help_text)
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            options.update(action="append", metavar="VALUE", help=help_text + "; repeatable")
        else:
            options["type"] = kind
            if choices:
                options["choices"] = choices
            else:
                options["metavar"] = name.split("_")[-1].upper()
        groups[section].add_argument(flag_name(path), **options)


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The given settings flags as a nested mapping like the config file."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest in TOP_LEVEL:
            out[dest] = value
        elif "." in dest and dest.split(".")[0] in PipelineConfig.model_fields:
            section, name = dest.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


def load_settings(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> PipelineConfig:
    """Defaults < config file < environment < flags < ``extra`` (``PipelineConfig.load``)."""
    from flows.config import merge

    overrides = settings_overrides(args)
    if extra:
        overrides = merge(overrides, extra)
    return PipelineConfig.load(getattr(args, "config", None), overrides)


def settings_table() -> str:
    """Markdown table of every setting: config key, flag, default, meaning."""
    lines = [
        "| config key | flag | default | meaning |",
        "|---|---|---|---|",
    ]
    for path, _, field, _, choices in _fields(PIPELINE_SECTIONS, frozenset()):
        meaning = field.description or ""
        if choices:
            meaning = f"{meaning}; one of {', '.join(map(str, choices))}".lstrip("; ")
        lines.append(f"| `{path}` | `{flag_name(path)}` | `{_default_text(field)}` | {meaning} |")
    return "\n".join(lines) + "\n"
