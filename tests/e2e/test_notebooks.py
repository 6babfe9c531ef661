"""The research notebooks run top to bottom (small settings: ADAFACE_NOTEBOOK_SMALL=1), and their own assert
cells check what they claim."""
import nbformat
import pytest
from nbclient import NotebookClient

from tests.support import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_there_are_four_notebooks_with_outputs_stripped():
    assert [p.name for p in NOTEBOOKS] == ["01_convert_align_embed.ipynb", "02_train_small.ipynb", "03_evaluate.ipynb",
                                           "04_paper_in_miniature.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs not stripped"
        # each notebook checks what it claims (asserts in its own cells), so running it is a test
        asserts = sum(line.lstrip().startswith("assert ") for c in nb.cells if c.cell_type == "code"
                      for line in c.source.splitlines())
        assert asserts >= 3, f"{path.name}: {asserts} assert statements"


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAFACE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("ADAFACE_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device inside the kernel
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
