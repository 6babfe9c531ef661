"""``adaface-jax info``: versions, devices and the architectures this build knows."""
from __future__ import annotations

import importlib.metadata
import platform


def add_arguments(parser):
    parser.add_argument("--params", action="store_true", help="also count parameters of every architecture")


def run(args) -> int:
    import jax

    from adaface_jax import __version__
    from adaface_jax.models import ARCHS

    print(f"adaface-jax {__version__}  (python {platform.python_version()})")
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow-cpu", "torch"):
        try:
            print(f"  {pkg:18s} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"  {pkg:18s} (not installed)")
    print(f"devices: {jax.device_count()} ({jax.default_backend()}), processes: {jax.process_count()}")
    for d in jax.local_devices():
        print(f"  {d}")
    print("architectures: " + ", ".join(ARCHS))
    if args.params:
        import jax.numpy as jnp

        from adaface_jax.models import build_model

        for name in ARCHS:
            model = build_model(name)
            shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 112, 112, 3))))
            n = sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))
            print(f"  {name:10s} {n / 1e6:8.2f} M parameters")
    return 0
