"""Registration: the start-up hook is cheap and lazy, and a built wheel ships the .pth at its root."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import BIN, subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def _py(code: str, **env) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**subprocess_env(), **env}, check=True)
    return proc.stdout.strip()


def test_hook_is_installed_but_imports_nothing_heavy():
    out = _py("import sys; print(type(sys.meta_path[0]).__name__, 'torch' in sys.modules, 'lm_eval' in sys.modules)")
    assert out == "_RegisterAfterImport False False"


def test_registry_resolves_sparse_ffn_and_hf_in_a_fresh_process():
    code = ("from lm_eval.api.registry import get_model; "
            "print(get_model('sparse_ffn').__name__, get_model('hf').__name__)")
    assert _py(code) == "SparseFFNLM HFLM"
    assert _py("import sys; print(type(sys.meta_path[0]).__name__)", SPARSE_FFN_NO_PLUGIN="1") != "_RegisterAfterImport"


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([str(BIN / "sparse-ffn"), "models", "fetch", "no-such-model"], capture_output=True,
                          text=True, env=subprocess_env())
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no-such-model" in proc.stderr
    proc = subprocess.run([str(BIN / "sparse-ffn"), "tasks", "write", "--data-dir", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "t")], capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_wheel_ships_the_pth_at_its_root(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here (needs hatchling from PyPI): {proc.stderr.strip()[-200:]}")
    wheel = next(tmp_path.glob("sparse_ffn-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "sparse_ffn.pth" in names and "sparse_ffn/plugin/startup.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[lm_eval.models]" in entry_points and "sparse_ffn = sparse_ffn.model_adapters" in entry_points
