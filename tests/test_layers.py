"""The package's architecture: layers import only downward (import-linter), every concept is defined
once, modules stay small, no private name crosses a module boundary."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sparse_ffn"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_layers_contract_is_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is a test dependency (pip install -e '.[test]')"
    proc = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "sparse_ffn layers KEPT" in proc.stdout and "broken" in proc.stdout and "0 broken" in proc.stdout


def test_the_contract_names_every_top_level_package():
    """A new folder must get a place in the layers, or the contract would not check it."""
    text = (ROOT / "pyproject.toml").read_text()
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    missing = [f for f in folders if f'"sparse_ffn.{f}"' not in text and f"sparse_ffn.{f} " not in text
               and f" sparse_ffn.{f}\"" not in text]
    assert not missing, missing


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_no_private_name_imported_across_modules():
    bad = []
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("sparse_ffn", ".")) or \
                    isinstance(node, ast.ImportFrom) and node.level:
                bad += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names
                        if a.name.startswith("_") and a.name != "__version__"]
    assert not bad, bad


# Each concept the architecture review found written several times, now defined exactly once.
ONCE = {
    "load_model": "sparse_ffn.model_adapters.loading",
    "load_tokenizer": "sparse_ffn.model_adapters.loading",
    "resolve_device": "sparse_ffn.model_adapters.loading",
    "resolve_dtype": "sparse_ffn.model_adapters.loading",
    "context_length": "sparse_ffn.model_adapters.loading",
    "check_fingerprint": "sparse_ffn.artifacts.provenance",
    "check_header": "sparse_ffn.artifacts.provenance",
    "created_by": "sparse_ffn.artifacts.provenance",
    "peak_memory": "sparse_ffn.artifacts.provenance",
    "check_target": "sparse_ffn.calibrate.ppl_search",
    "add_ffn_options": "sparse_ffn.cli.options",
    "parse_bytes": "sparse_ffn.cli.options",
    "ffn_names": "sparse_ffn.core.names",
    "count_forwards": "sparse_ffn.core.counting",
    "linear_weight": "sparse_ffn.core.ffn",
    "is_conv1d": "sparse_ffn.core.ffn",
}


def _definitions() -> Counter:
    found: Counter = Counter()
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                found[(node.name, _module_name(path))] += 1
    return found


@pytest.mark.parametrize("name", sorted(ONCE))
def test_concept_is_defined_once(name):
    where = [mod for (n, mod), k in _definitions().items() if n == name for _ in range(k)]
    assert where == [ONCE[name]], where


def test_peak_rss_is_read_in_one_place():
    users = [str(p.relative_to(ROOT)) for p in MODULES if "ru_maxrss" in p.read_text()]
    assert users == ["sparse_ffn/artifacts/provenance.py"], users


def test_fat_and_topk_arguments_are_checked_by_the_registry_only():
    """The kept-ratio / eps rules live in the strategy registry; commands call its check."""
    users = [str(p.relative_to(ROOT)) for p in MODULES if "kept ratio in (0, 1]\")" in p.read_text()
             or "needs a kept ratio" in p.read_text()]
    assert users == ["sparse_ffn/core/masking.py"], users
    from sparse_ffn.core.masking import STRATEGIES

    assert set(STRATEGIES) == {"dense", "fat", "topk", "cett"}
    assert {s.site for s in STRATEGIES.values()} == {"act", "down"}


def test_every_model_command_has_the_ffn_options():
    from sparse_ffn.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    commands = {"serve": sub["serve"], "inspect": sub["inspect"], "sweep": sub["sweep"], "ppl": sub["ppl"]}
    calibrate = next(a for a in sub["calibrate"]._actions if a.dest == "calibrate_command").choices
    commands.update({"calibrate thresholds": calibrate["thresholds"], "calibrate experts": calibrate["experts"]})
    for name, p in commands.items():
        flags = {s for a in p._actions for s in a.option_strings}
        assert {"--ffn-layers", "--ffn-down", "--ffn-act", "--ffn-gate", "--ffn-up", "--ffn-gate-up"} <= flags, name
        assert "--device" in flags, name
