"""What the tests share that is not a pytest fixture: independent references (``torch_reference``), data writers,
the loopback Cloud Storage server, and the scripts that multi-process tests start. Imported one way:
``from tests.support.<module> import ...``."""
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]
