"""Load a ``configs/*.py`` recipe and apply ``--config.a.b=value`` overrides (typed like the field)."""
from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections

from adaface_jax import io
from adaface_jax.errors import InputError


def load_config(path: str) -> ml_collections.ConfigDict:
    """Import ``path`` and call its ``get_config()``; ``path:arg`` calls ``get_config("arg")`` (the
    ml_collections config_flags convention, e.g. ``configs/paper_miniature.py:small``)."""
    arg = None
    if "://" in path:
        raise InputError(f"--config {path}: a recipe is a local Python file (configs/*.py); copy it from the bucket "
                         "first")
    io.check_path(path, "--config")  # a URL typed with one slash ('gs:/b/x') is refused, not looked up locally
    if not io.isfile(path) and ":" in path:
        path, arg = path.rsplit(":", 1)
    if not io.isfile(path):
        raise InputError(f"--config {path}: file not found (expected a configs/*.py recipe)")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if repo_root not in sys.path:  # recipes import configs.common
        sys.path.insert(0, repo_root)
    spec = importlib.util.spec_from_file_location(f"_adaface_config_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise InputError(f"--config {path}: not a Python file; expected a configs/*.py recipe defining get_config()")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a recipe is user input: report its error in one line
        raise InputError(f"--config {path}: could not be loaded ({type(e).__name__}: {e})") from e
    if not hasattr(module, "get_config"):
        raise InputError(f"--config {path}: defines no get_config()")
    try:
        config = module.get_config() if arg is None else module.get_config(arg)
    except (TypeError, ValueError) as e:  # e.g. an unknown setting name
        raise InputError(f"--config {path}{'' if arg is None else ':' + arg}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise InputError(f"--config {path}: get_config() returned {type(config).__name__}, expected a ConfigDict")
    return config


def _parse_like(old, text: str, field: str):
    if isinstance(old, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise InputError(f"--config.{field}={text!r}: expected a boolean")
    try:
        if isinstance(old, int):
            return int(text)
        if isinstance(old, float):
            return float(text)
        if isinstance(old, (tuple, list)):
            items = [t for t in text.replace("(", "").replace(")", "").split(",") if t.strip()]
            kind = type(old[0]) if old else str
            return tuple(_parse_like(kind(), t.strip(), field) if kind is not str else t.strip() for t in items)
    except ValueError as e:
        raise InputError(f"--config.{field}={text!r}: expected {type(old).__name__} ({e})") from None
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """``{'data.data_dir': '/x', 'lr': '0.05'}`` -> config with those fields set (unknown fields are an error)."""
    for dotted, text in overrides.items():
        node = config
        parts = dotted.split(".")
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise InputError(f"--config.{dotted}: config has no section {p!r}")
            node = node[p]
        if parts[-1] not in node:
            raise InputError(f"--config.{dotted}: unknown config field (known here: {sorted(node.keys())})")
        if isinstance(node[parts[-1]], ml_collections.ConfigDict):
            raise InputError(section_value_message(dotted, text, node[parts[-1]]))
        try:
            node[parts[-1]] = _parse_like(node[parts[-1]], text, dotted)
        except TypeError as e:  # ml_collections' type check of the field
            raise InputError(f"--config.{dotted}={text!r}: {e}") from None
    return config


# The field a user usually means when they write a value onto a whole section.
SECTION_MAIN_FIELD = {"model": "arch", "head": "name", "data": "data_dir", "checkpoint": "every_steps",
                      "evals": "verification.sets", "loss_scale": "init"}


def section_value_message(dotted: str, text: str, section: ml_collections.ConfigDict) -> str:
    """``--config.model=ir_50``: one line saying that ``model`` is a section and which key to set instead."""
    last = dotted.rsplit(".", 1)[-1]
    main = SECTION_MAIN_FIELD.get(last) if "." not in dotted else None
    hint = (f"did you mean --config.{dotted}.{main}={text}?" if main else
            f"set one of its fields: {', '.join(f'--config.{dotted}.{k}' for k in sorted(section.keys()))}")
    return f"--config.{dotted}={text!r}: config.{dotted} is a section, not a value; {hint}"


def split_override_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Pull ``--config.x=v`` / ``--config.x v`` out of argv; returns (overrides, the rest)."""
    overrides, rest, i = {}, [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            key = a[len("--config."):]
            if "=" in key:
                key, val = key.split("=", 1)
            elif i + 1 < len(argv):
                i += 1
                val = argv[i]
            else:
                raise ValueError(f"{a}: missing value")
            overrides[key] = val
        else:
            rest.append(a)
        i += 1
    return overrides, rest
