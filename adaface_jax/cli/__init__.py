"""The `adaface-jax` command: a registry of subcommands, one module per command in this folder.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and stays thin: the
logic lives in the library, where notebooks can call it too. Only the chosen command's module is
imported, so ``adaface-jax --help`` does not pay for TensorFlow, JAX or torch. A module that sets
``CONFIG_OVERRIDES = True`` also takes ``--config.a.b=value`` arguments (``args.overrides``).

Expected failures (``adaface_jax.errors.InputError``, ``evaluation.ProtocolError``, ``OSError``)
become one line on stderr, ``adaface-jax <command>: error: <what>``, and exit status 1; pass
``--debug`` (or set ``ADAFACE_DEBUG=1``) to see the traceback. Any other exception is a bug and
keeps its traceback. In a run of several processes (``train`` on a pod), a process that fails tells the others,
which stop with one line naming it, and all exit at once (``adaface_jax.parallel.fail_run``).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from adaface_jax.errors import InputError, one_line

# command -> one-line help; the module is adaface_jax.cli.<command>
COMMANDS = {
    "info": "show versions, devices and the model zoo",
    "convert": "convert a PyTorch AdaFace .ckpt into a converted (orbax) directory",
    "export": "export a model to ONNX, a TensorFlow SavedModel or a PyTorch state_dict",
    "prepare": "convert .rec / image folders / list files into TFRecords (or cache a .bin)",
    "synthesize": "render the synthetic identity dataset as TFRecords",
    "check": "pre-flight a prepared dataset: decode every record, verify counts and checksums",
    "train": "train a model from a configs/ recipe",
    "evaluate": "run an evaluation protocol (hq, ijbb, ijbc, ijbs, tinyface)",
    "embed": "embed images (optionally detect + align first)",
    "compare": "print the similarity matrix of face photos (and same-person decisions once calibrated)",
    "calibrate": "cosine thresholds at target false accept rates from a verification set, stored with the model",
    "quickstart": "synthesize data, train, evaluate and plot on this machine",
    "miniature": "the paper in miniature: AdaFace vs CosFace, ArcFace and an oracle on hard low-quality faces",
}
DEBUG_ENV = "ADAFACE_DEBUG"
DESCRIPTION = ("AdaFace face recognition in JAX: convert the released PyTorch models, prepare data, train on every "
               "device of every host, evaluate on the standard protocols, and embed or compare photos. Every path "
               "may be a local path or a gs:// URL.")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2, as argparse) naming the command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum`` (``what`` names it in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        return value

    parse.__name__ = f"{what} integer"
    return parse


positive_int = _int_at_least(1, "positive")
non_negative_int = _int_at_least(0, "non-negative")


def expected_errors() -> tuple:
    """The exceptions a command (or a benchmark harness) reports as one line: bad input, not bugs."""
    from evaluation import ProtocolError  # noqa: PLC0415  (pure numpy package, cheap)

    return InputError, ProtocolError, OSError


def _command_module(name: str):
    """The command's module; a missing module is an error, never a silently dropped command."""
    return importlib.import_module(f"adaface_jax.cli.{name}")


def _top_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="adaface-jax", description=DESCRIPTION)
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Take ``--debug`` out of argv (before a ``--``), wherever it stands."""
    if "--" in argv:
        cut = argv.index("--")
        head, tail = argv[:cut], argv[cut:]
    else:
        head, tail = argv, []
    debug = "--debug" in head
    return [a for a in head if a != "--debug"] + tail, debug


def parse_command(argv: list[str]):
    """-> (command name, its module, parsed args). ``--config.a.b=v`` go to ``args.overrides`` for
    modules that take them (one ``split_override_args`` step before argparse)."""
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv)  # help, or a one-line error for an unknown command
        raise SystemExit(2)
    name = argv[0]
    module = _command_module(name)
    parser = _Parser(prog=f"adaface-jax {name}", description=COMMANDS[name])
    module.add_arguments(parser)
    rest, overrides = argv[1:], {}
    if getattr(module, "CONFIG_OVERRIDES", False):
        from adaface_jax.train.config import split_override_args  # noqa: PLC0415

        try:
            overrides, rest = split_override_args(rest)
        except ValueError as e:
            parser.error(str(e))
    args = parser.parse_args(rest)
    args.overrides = overrides
    return name, module, args


def quiet_native_logs() -> None:
    """TensorFlow prints start-up notices to stderr from C++ before its log level applies (the oneDNN
    notice among them), and libjpeg's complaints about a broken file that the pipeline then reports
    itself; a command's stderr should hold only what the command has to say (set the variables to
    see them). TF's oneDNN rewrites matter for its convolutions and matmuls, which the input pipeline
    does not rely on."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def main(argv: list[str] | None = None) -> int:
    quiet_native_logs()
    argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    debug = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    name, module, args = parse_command(argv)
    try:
        return int(module.run(args) or 0)
    except expected_errors() as exc:
        if debug:
            traceback.print_exc()
        print(f"adaface-jax {name}: error: {one_line(exc)}", file=sys.stderr)
        _leave_the_run(one_line(exc), 1)
        return 1
    except KeyboardInterrupt:
        print(f"adaface-jax {name}: interrupted", file=sys.stderr)
        _leave_the_run("interrupted", 130)
        return 130
    except Exception as exc:
        if _multiprocess():
            from adaface_jax import parallel  # noqa: PLC0415

            # A collective fails when another process has left: say that one's error, not this traceback.
            parallel.leave_for_peer_failure(peer_failed(name), wait_s=PEER_FAILURE_WAIT_S)
            traceback.print_exc()
            _leave_the_run(f"{type(exc).__name__}: {one_line(exc)}", 1)
        raise


# How long a process whose collective failed waits for another process to say that it failed first.
PEER_FAILURE_WAIT_S = 3.0


def _multiprocess() -> bool:
    """Whether this process is one of several (jax.distributed started); never imports JAX itself."""
    if "jax" not in sys.modules:
        return False
    from adaface_jax import parallel  # noqa: PLC0415

    return parallel.is_multiprocess_run()


def peer_failed(name: str):
    """What a process of ``adaface-jax NAME`` says when another process of its run has failed."""
    def say(process: int, message: str) -> str:
        import jax  # noqa: PLC0415

        return (f"adaface-jax {name}: error: process {process} of {jax.process_count()} failed ({message}); "
                f"stopping this process too")
    return say


def _leave_the_run(message: str, status: int) -> None:
    """This process failed (``message`` already said). Alone, it returns. One of several would leave the others
    waiting in their collectives and itself wait in jax.distributed's shutdown barrier: it tells them and exits
    now (``parallel.fail_run``)."""
    if _multiprocess():
        from adaface_jax import parallel  # noqa: PLC0415

        parallel.fail_run(message, status)
