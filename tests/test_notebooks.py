"""The notebooks of ``notebooks/``: committed without outputs, and executed top to bottom (``slow``).

Each notebook ends with a cell of assertions on its own results, so executing it checks them. The kernel is
ipykernel's own ``python3`` spec for *this* interpreter (``sys.executable``), never a kernelspec registered
elsewhere on the machine. Needs ``nbformat``, ``nbclient`` and ``ipykernel`` (the ``dev`` extra). The test
sets ``LL_NOTEBOOK_QUICK=1`` (fewer epochs) and sends the notebooks' logs to a temporary folder
(``LL_NOTEBOOK_LOG_DIR``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
EXPECTED = [
    "01_quickstart",
    "02_compare_losses",
    "03_write_your_own_loss",
    "04_metric_learning",
    "05_distillation_multitask",
    "06_robustness",
    "07_reinforcement_learning",
]
CELL_TIMEOUT_S = 300


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def test_the_expected_notebooks_exist():
    assert [path.stem for path in notebook_paths()] == EXPECTED


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda path: path.stem)
def test_notebook_is_committed_clean(path: Path):
    """No outputs or execution counts (nothing stale from another code version); ends with assertions."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells, f"{path.name} has no code"
    for index, cell in enumerate(code_cells):
        assert cell.outputs == [], f"{path.name}: code cell {index} has outputs; clear them before committing"
        assert cell.execution_count is None, f"{path.name}: code cell {index} has an execution count"
    assert "assert " in code_cells[-1].source, f"{path.name} must end with a cell that asserts its results"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", notebook_paths(), ids=lambda path: path.stem)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Execute every cell in a fresh kernel; any exception (a failed final assertion included) fails."""
    import nbclient
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    monkeypatch.setenv("LL_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("LL_NOTEBOOK_LOG_DIR", str(tmp_path))
    # no kernel directories: "python3" resolves to ipykernel's built-in spec for sys.executable
    kernel_manager = AsyncKernelManager(
        kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[])
    )
    assert kernel_manager.kernel_spec.argv[0] == sys.executable, kernel_manager.kernel_spec.argv
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        km=kernel_manager,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(ROOT)}},
    )
    start = time.perf_counter()
    client.execute()
    print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s")
    assert not any(NOTEBOOK_DIR.glob("**/metrics.csv")), "a notebook wrote its logs into notebooks/"
