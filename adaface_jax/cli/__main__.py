"""``python -m adaface_jax.cli``: the same as the ``adaface-jax`` command."""
import sys

from adaface_jax.cli import main

sys.exit(main())
