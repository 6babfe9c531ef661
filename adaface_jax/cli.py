"""The `adaface-jax` command: thin subcommands that call the library.

Each subcommand lives in the module that owns its logic and exposes two functions,
``add_arguments(parser)`` and ``run(args) -> int``.  Modules are imported only when their
subcommand is chosen, so ``adaface-jax info`` does not pay for TensorFlow or torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "info": ("adaface_jax.info", "show versions, devices and the model zoo"),
    "convert": ("adaface_jax.convert.cli", "convert a PyTorch AdaFace .ckpt into an orbax checkpoint"),
    "export": ("adaface_jax.convert.cli_export", "export a converted/trained checkpoint back to a PyTorch state_dict"),
    "prepare": ("data_pipeline.cli", "convert .rec / image folders / list files / .bin into TFRecords"),
    "synthesize": ("data_pipeline.synthetic_cli", "render the synthetic identity dataset as TFRecords"),
    "train": ("adaface_jax.train.cli", "train a model from a configs/ recipe"),
    "evaluate": ("evaluation.cli", "run an evaluation protocol (hq, ijbb, ijbc, ijbs, tinyface)"),
    "embed": ("adaface_jax.inference_cli", "embed images (optionally detect + align first)"),
    "compare": ("adaface_jax.inference_cli_compare", "print the similarity matrix of face photos"),
    "quickstart": ("adaface_jax.quickstart", "synthesize data, train, evaluate and plot on this machine"),
}


def _available() -> dict[str, tuple[str, str]]:
    found = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None:
            continue
        try:
            if importlib.util.find_spec(module) is None:
                continue
        except ModuleNotFoundError:
            continue
        found[name] = (module, help_text)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaface-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Arguments are added lazily for the chosen subcommand only (see main).
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    available = _available()
    if argv and argv[0] in available:
        name = argv[0]
        module_name, help_text = available[name]
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"adaface-jax {name}", description=help_text)
        module.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        return int(module.run(args) or 0)
    build_parser().parse_args(argv)  # prints usage / errors for unknown commands
    return 2


if __name__ == "__main__":
    sys.exit(main())
