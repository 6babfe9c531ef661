"""Load a ``configs/*.py`` recipe and apply ``--config.a.b=value`` overrides (typed like the field)."""
from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections


def load_config(path: str) -> ml_collections.ConfigDict:
    """Import ``path`` and call its ``get_config()``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: file not found")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if repo_root not in sys.path:  # recipes import configs.common
        sys.path.insert(0, repo_root)
    spec = importlib.util.spec_from_file_location(f"_adaface_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {path}: defines no get_config()")
    return module.get_config()


def _parse_like(old, text: str, field: str):
    if isinstance(old, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--config.{field}={text!r}: expected a boolean")
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
        raise ValueError(f"--config.{field}={text!r}: expected {type(old).__name__} ({e})") from None
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """``{'data.data_dir': '/x', 'lr': '0.05'}`` -> config with those fields set (unknown fields are an error)."""
    for dotted, text in overrides.items():
        node = config
        parts = dotted.split(".")
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise KeyError(f"--config.{dotted}: config has no section {p!r}")
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"--config.{dotted}: unknown config field (known here: {sorted(node.keys())})")
        node[parts[-1]] = _parse_like(node[parts[-1]], text, dotted)
    return config


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


def accept_config_overrides(parser) -> None:
    """Make ``parser.parse_args`` take ``--config.a.b=value`` arguments (which cannot be declared in
    advance) out of argv first; they end up in ``namespace.overrides`` as a dict."""
    import sys

    parse_known = parser.parse_known_args

    def parse_args(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        try:
            overrides, rest = split_override_args(args)
        except ValueError as e:
            parser.error(str(e))
        ns, unknown = parse_known(rest, namespace)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        ns.overrides = overrides
        return ns

    parser.parse_args = parse_args
