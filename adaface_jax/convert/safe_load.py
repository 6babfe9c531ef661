"""Read PyTorch checkpoints without ever executing pickled code.

1. ``torch.load(weights_only=True)``: enough for the released models ({'state_dict': ...}).
2. Otherwise (full Lightning checkpoints carry e.g. ``AttributeDict`` hyper-parameters) a restricted
   unpickler: globals on torch's own weights-only allowlist (tensors, storages, dtypes, containers)
   resolve normally; every other global resolves to an inert *stub class*.  Instantiating a stub the
   way pickle rebuilds plain objects (NEWOBJ + BUILD) gives a dict holding the object's items and
   state, so a Lightning ``AttributeDict`` loads as a dict.  *Calling* a stub -- what a ``__reduce__``
   that returns e.g. ``(os.system, ('...',))`` asks for -- raises ``UnsafeCheckpointError``: nothing
   outside the allowlist ever runs.
"""
from __future__ import annotations

import collections
import os
import pickle
import types
import warnings

from adaface_jax import io
from adaface_jax.errors import InputError


class UnsafeCheckpointError(pickle.UnpicklingError, InputError):
    """The checkpoint asks to call code outside the allowlist; loading is refused."""


class CheckpointReadError(InputError):
    """The file is missing, truncated or not a PyTorch checkpoint."""


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_PROTO = 0x80           # the legacy format starts with a pickled magic number


def import_torch():
    """torch, the optional ``[torch]`` extra (PyTorch checkpoints are read and written with it); a
    missing install is one line that says what to install."""
    try:
        import torch  # noqa: PLC0415  (optional heavy dependency: only where PyTorch files are touched)
    except ImportError:
        raise InputError("reading or writing a PyTorch checkpoint needs torch: pip install 'adaface-jax[torch]'") \
            from None
    return torch


def _allowed_globals() -> dict:
    torch = import_torch()
    wou = torch._weights_only_unpickler

    allowed = dict(wou._get_allowed_globals())
    allowed.update({
        "collections.OrderedDict": collections.OrderedDict,
        "collections.Counter": collections.Counter,
        "collections.defaultdict": collections.defaultdict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.slice": slice,
        "builtins.complex": complex,
        "builtins.bytearray": bytearray,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    })
    return allowed


class _StubMeta(type):
    def __call__(cls, *args, **kwargs):
        raise UnsafeCheckpointError(
            f"refusing to call {cls.__qualname__!r} while loading a checkpoint: it is not a tensor, container "
            "or primitive type, so calling it could run arbitrary code")


class StubObject(dict, metaclass=_StubMeta):
    """An object of a class outside the allowlist, kept as its items plus ``'__state__'``."""

    stub_of = "?"

    def __setstate__(self, state):
        # BUILD: plain objects pickle their __dict__ (or (dict, slots)) as state.
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.setdefault("__state__", {}).update(state)
        elif state is not None:
            self["__state__"] = state


def _stub_class(module: str, name: str) -> type:
    qualname = f"{module}.{name}"
    return _StubMeta(name, (StubObject,), {"stub_of": qualname, "__qualname__": qualname, "__module__": __name__})


class RestrictedUnpickler(pickle.Unpickler):
    _allowed = None

    def find_class(self, module, name):
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _allowed_globals()
        obj = self._allowed.get(f"{module}.{name}")
        if obj is not None:
            return obj
        return _stub_class(module, name)


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# What torch.load(pickle_module=...) needs: Unpickler (zip format) and load (legacy format).
restricted_pickle = types.SimpleNamespace(
    __name__="adaface_jax_restricted_pickle", Unpickler=RestrictedUnpickler, load=_restricted_load,
    UnpicklingError=pickle.UnpicklingError)


def read_torch_checkpoint(path: str | os.PathLike):
    """The unpickled content of a ``.ckpt``/``.pt`` file, loaded on CPU without running pickled code.

    Any failure to parse the file (truncated, not a checkpoint at all) is a ``CheckpointReadError``
    naming the file; a pickle that asks to run code is an ``UnsafeCheckpointError``."""
    torch = import_torch()

    path = io.check_path(path, "checkpoint")
    if io.isdir(path):
        raise CheckpointReadError(f"{path}: is a directory, expected a PyTorch checkpoint file (or pass a converted "
                                  "directory or a training workdir where one is accepted)")
    if not io.isfile(path):
        raise CheckpointReadError(f"{path}: no such checkpoint file")
    with io.open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointReadError(f"{path}: empty file, expected a PyTorch checkpoint")
    if head != _ZIP_MAGIC and head[0] != _PICKLE_PROTO:
        raise CheckpointReadError(f"{path}: not a PyTorch checkpoint (expected a torch.save zip archive or pickle; "
                                  f"the file starts with {head!r})")
    # torch.load wants a file name (a bucket's file is read from a local copy)
    with io.local_copy(path, suffix=".ckpt") as local, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about pickle protocols on stderr; the result says enough
        try:
            return torch.load(local, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as weights_only_error:
            first_error = weights_only_error  # e.g. a Lightning checkpoint's AttributeDict: try the allowlist
        except Exception as e:  # noqa: BLE001  (untrusted bytes: any parse failure means a bad file)
            raise CheckpointReadError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                                      f"{type(e).__name__}: {_first_line(e)}") from e
        try:
            return torch.load(local, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"{path}: {e}") from first_error
        except Exception as e:  # noqa: BLE001
            raise CheckpointReadError(f"{path}: could not be read with the restricted unpickler (truncated or "
                                      f"corrupt?): {type(e).__name__}: {_first_line(e)}") from e


def _first_line(exc: BaseException) -> str:
    """The first sentence of the first line (torch's parse errors run on for several sentences)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return first.split(". ")[0].rstrip(".")
