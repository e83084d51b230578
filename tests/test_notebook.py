"""The Colab notebook runs top to bottom on the CPU with a tiny budget.

The notebook's parameters cell (tagged "parameters") is followed by an injected
cell that overrides its values, the way papermill does it; the kernel is this
interpreter, registered as a kernel spec in a temporary directory.
"""

import ast
import csv
import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "cvpo_tpu.ipynb"
KERNEL = "cvpo-jax-test"

# A few hundred env steps of HalfCheetah on brax's cheapest backend, tiny networks.
TINY = {
    "ENV": "brax/HalfCheetahVelocity",
    "BACKEND": "spring",
    "EPISODE_LENGTH": 50,
    "COST_LIMIT": 5.0,
    "NUM_SEEDS": 2,
    "SEED": 0,
    "TOTAL_STEPS": 400,
    "NUM_ENVS": 2,
    "LOG_EVERY": 100,
    "CHECKPOINT_EVERY": 200,
    "WARMUP_STEPS": 100,
    "BATCH_SIZE": 32,
    "BUFFER_SIZE": 1000,
    "UPDATE_EVERY": 50,
    "UPDATE_RATIO": 0.1,
    "HIDDEN": (16, 16),
    "ALGO_EXTRA": {
        "num_samples": 4,
        "dual_steps": 3,
        "mstep_steps": 1,
        "num_reward_critics": 1,
        "num_cost_critics": 1,
    },
    "RESUME": False,
    "RENDER_STEPS": 20,
}


def _assigned_names(source: str) -> set[str]:
    return {
        target.id
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def with_parameters(nb, values: dict):
    """Inserts a cell assigning `values` right after the cell tagged "parameters"."""
    (index,) = [
        i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])
    ]
    unknown = set(values) - _assigned_names(nb.cells[index].source)
    assert not unknown, f"not parameters of the notebook: {sorted(unknown)}"
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return nb


def kernel_spec(root: Path) -> Path:
    """A kernel spec running this interpreter (the venv's), under `root`/kernels."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    env = {
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "MPLBACKEND": "Agg",
    }
    kernel = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cvpo-jax test",
        "language": "python",
        "env": env,
    }
    (spec / "kernel.json").write_text(json.dumps(kernel))
    return root


def test_notebook_is_valid_and_has_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert set(TINY) <= _assigned_names(
        next(c for c in nb.cells if "parameters" in c.metadata.get("tags", [])).source
    )
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # Stored clean.


def execute(tmp_path, values: dict, name: str):
    """The notebook executed with `values` injected; the executed copy is kept."""
    nb = with_parameters(nbformat.read(NOTEBOOK, as_version=4), values)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute()  # Raises CellExecutionError naming the cell that failed.
    finally:
        nbformat.write(nb, tmp_path / name)  # For a look after a failure.
    return nb


def cell_outputs(nb, marker: str) -> list:
    """The outputs of the one code cell whose source contains `marker`."""
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    return cell.outputs


def cell_text(nb, marker: str) -> str:
    return "".join(o.get("text", "") for o in cell_outputs(nb, marker))


def metrics_rows(run: Path, seed: int) -> list[dict]:
    with open(run / f"seed{seed}" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_notebook_runs_end_to_end_on_cpu_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_spec(tmp_path / "jupyter")))
    nb = execute(tmp_path, {**TINY, "RUN_DIR": str(tmp_path / "run")}, "executed.ipynb")

    run = tmp_path / "run"
    for seed in range(2):
        rows = metrics_rows(run, seed)
        assert [int(r["env_steps"]) for r in rows] == [100, 200, 300, 400]
        # Every env ends one 50-step episode per 100 env steps; returns are real numbers.
        assert all(float(r["episode_length"]) == 50 for r in rows)
        assert all(float(r["episode_return"]) != 0 for r in rows)
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG")

    assert "completed: 400 env steps x 2 seeds" in cell_text(nb, "train_on_device(")
    assert any("image/png" in o.get("data", {}) for o in cell_outputs(nb, "plot_runs("))
    assert "seed1: last logged return" in cell_text(nb, "plot_runs(")
    assert "seed 0 at env step 400: 20 steps" in cell_text(nb, "def rollout(")
    render = cell_outputs(nb, "html.render(")
    assert any("text/html" in o.get("data", {}) for o in render), cell_text(nb, "html.render(")

    # The notebook's save/resume path: RESUME = True continues the same run directory
    # from its last checkpoint (400) to a longer budget, every seed's log continuing.
    resumed = execute(
        tmp_path,
        {**TINY, "RUN_DIR": str(tmp_path / "run"), "RESUME": True, "TOTAL_STEPS": 600},
        "resumed.ipynb",
    )
    assert "completed: 600 env steps x 2 seeds" in cell_text(resumed, "train_on_device(")
    assert "seed 0 at env step 600: 20 steps" in cell_text(resumed, "def rollout(")
    for seed in range(2):
        rows = metrics_rows(run, seed)
        assert [int(r["env_steps"]) for r in rows] == [100, 200, 300, 400, 500, 600]


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("CVPO_NAV_NOTEBOOK"),
    reason="compiles MJX's navigation task for ~5 min on 2 cores: run with CVPO_NAV_NOTEBOOK=1",
)
def test_notebook_trains_a_navigation_task(tmp_path, monkeypatch):
    """ENV = "mjx/PointGoal1": the same cells build the MJX task, train it on the device
    loop and draw the deterministic rollout from above (no brax viewer)."""
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_spec(tmp_path / "jupyter")))
    values = {**TINY, "ENV": "mjx/PointGoal1", "BACKEND": "mjx", "RUN_DIR": str(tmp_path / "run")}
    nb = execute(tmp_path, values, "executed_nav.ipynb")
    run = tmp_path / "run"
    for seed in range(2):
        rows = metrics_rows(run, seed)
        assert [int(r["env_steps"]) for r in rows] == [100, 200, 300, 400]
        assert all(float(r["episode_length"]) == 50 for r in rows)
    assert "observation size 60, action size 2" in cell_text(nb, "make_jax_env(")
    assert "completed: 400 env steps x 2 seeds" in cell_text(nb, "train_on_device(")
    assert "seed 0 at env step 400: 20 steps" in cell_text(nb, "def rollout(")
    assert any("image/png" in o.get("data", {}) for o in cell_outputs(nb, "plot_navigation("))
    assert (run / "rollout.png").read_bytes().startswith(b"\x89PNG")
