"""The notebooks: committed without outputs, each opening in Colab from the README, and each running top to bottom.

Each notebook's cell tagged `parameters` holds its real settings; the run here injects a cell after it (as papermill
does) that shrinks steps and sizes to what two CPU cores get through in seconds. The kernel is this interpreter, so
it imports the tinylm under test, and inherits the environment conftest.py sets (cache, offline mirror).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import TINY_PIPELINE

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
COLAB = "https://colab.research.google.com/github/OWNER/tinylm/blob/main/notebooks/"

# What each notebook runs with here, and a file its run must leave behind (relative to its working folder).
SMALL_SETTINGS = {
    "01_quickstart.ipynb": (
        {"MAX_STEPS": 40, "EVAL_INTERVAL": 20, "EVAL_BATCHES": 2, "MAX_NEW_TOKENS": 40, "THREADS": 1},
        "out/shakespeare-char/model.safetensors",
    ),
    "02_tinystories.ipynb": (
        {
            "MAX_STEPS": 40,
            "EVAL_INTERVAL": 20,
            "EVAL_BATCHES": 2,
            "VOCAB_SIZE": 512,
            "N_LAYER": 2,
            "N_EMBD": 64,
            "BLOCK_SIZE": 64,
            "MAX_NEW_TOKENS": 30,
            "THREADS": 1,
        },
        "out/tinystories-llama-hf/model.safetensors",
    ),
    "03_finetune_lora.ipynb": (
        {
            "MAX_EXAMPLES": 24,
            "HELD_OUT": 2,
            "MAX_LENGTH": 96,
            "MAX_STEPS": 2,
            "BATCH_SIZE": 2,
            "LORA_R": 4,
            "MAX_NEW_TOKENS": 12,
            "THREADS": 1,
        },
        "out/smollm2-gsm8k-lora/adapter_model.safetensors",
    ),
    "04_attention_is_all_you_need.ipynb": (
        {"MAX_STEPS": 120, "EVAL_INTERVAL": 40, "MAX_LENGTH": 6, "VAL_SEQUENCES": 50, "THREADS": 1, "EXAMPLE": "3 1 4"},
        "out/reverse-task/cross_attention.png",
    ),
    "05_pipeline.ipynb": (
        {
            "RECIPE": str(REPO / "configs" / "pipeline-tinystories-cpu.yaml"),
            "OVERRIDES": TINY_PIPELINE,
            "MAX_NEW_TOKENS": 12,
        },
        "out/pipeline-tinystories-cpu/export/model.gguf",
    ),
}


def test_every_notebook_is_tested_and_committed_clean():
    assert {path.name for path in NOTEBOOKS} == set(SMALL_SETTINGS)
    readme = (REPO / "README.md").read_text()
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(cell.outputs == [] and cell.execution_count is None for cell in code), f"{path.name} has outputs"
        tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged parameters"
        for name in SMALL_SETTINGS[path.name][0]:
            assert f"\n{name} = " in "\n" + tagged[0].source, f"{path.name}: {name} is not a parameter"
        assert COLAB + path.name in readme, f"README.md has no Colab badge for {path.name}"
        assert COLAB + path.name in notebook.cells[0].source, f"{path.name} opens without its own Colab badge"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernelspec that starts this very interpreter, found before any other by way of JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / "tinylm-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "tinylm test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    return "tinylm-test"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL_SETTINGS))
def test_notebook_runs_with_small_settings(name, kernel_name, tmp_path):
    settings, leaves = SMALL_SETTINGS[name]
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    injected = "\n".join(f"{key} = {value!r}" for key, value in settings.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    work = tmp_path / "work"
    work.mkdir()
    client = nbclient.NotebookClient(
        notebook, kernel_name=kernel_name, timeout=300, resources={"metadata": {"path": str(work)}}
    )
    client.execute()
    assert (work / leaves).is_file()
