"""`sparse-ffn ppl`: the same number as `perplexity()` in process, dense, with experts, with thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from sparse_ffn.calibrate.experts import ExpertsSettings, calibrate_experts
from sparse_ffn.cli import main
from sparse_ffn.artifacts.data import load_text, token_windows
from sparse_ffn.core.perplexity import perplexity
from sparse_ffn.tasks.paper_ppl import METRIC
from tiny import CORPUS, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 32




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    model = make_tiny_model("llama", root / "llama")
    other = make_tiny_model("llama", root / "llama_2layers", num_hidden_layers=2)
    calib, test = root / "calib.txt", root / "test.txt"
    calib.write_text(CORPUS * 6)
    test.write_text("\n\n".join(reversed(CORPUS.splitlines())) * 4)
    tok = transformers.AutoTokenizer.from_pretrained(model)
    net = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
    settings = ExpertsSettings(num_clusters=3, sparsity=0.5, kmeans_restarts=2)
    text, sha = load_text(str(calib))
    res = calibrate_experts(net, token_windows(tok, text, SEQ, 6 * SEQ), settings, root / "experts",
                            data={"source": str(calib), "sha256": sha}, keep_applied=True, progress=False,
                            batch_size=4)
    windows = token_windows(tok, test.read_text(), SEQ)
    expanded = perplexity(net, windows, batch_size=2)
    res.handle.remove()
    dense = perplexity(net, windows, batch_size=2)
    return {"root": root, "model": model, "other": other, "test": test, "experts": res.path, "windows": windows,
            "expanded": expanded, "dense": dense}


def run_ppl(capsys, *args: str) -> dict:
    assert main(["ppl", "--quiet", "--threads", "1", *args]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_dense_equals_perplexity_in_process(tiny, capsys):
    r = run_ppl(capsys, "--model", str(tiny["model"]), "--data", str(tiny["test"]), "--seq-len", str(SEQ),
                "--batch-size", "2")
    assert r["perplexity"] == tiny["dense"]["perplexity"] and r["nll"] == tiny["dense"]["nll"]
    n = tiny["windows"].shape[0]
    assert r["windows"] == r["windows_available"] == n and r["tokens"] == n * (SEQ - 1) and r["seq_len"] == SEQ
    assert r["metric"] == METRIC and r["artifact"] is None and r["sparsity"] is None
    assert len(r["data"]["sha256"]) == 64 and r["model"]["fingerprint"]["num_layers"] == 3
    assert r["sparse_ffn_version"]


def test_batch_size_and_tokens(tiny, capsys):
    r = run_ppl(capsys, "--model", str(tiny["model"]), "--data", str(tiny["test"]), "--seq-len", str(SEQ),
                "--tokens", str(3 * SEQ + 5))
    expect = perplexity(transformers.AutoModelForCausalLM.from_pretrained(tiny["model"]).eval(), tiny["windows"][:3])
    assert r["windows"] == 3 and r["perplexity"] == pytest.approx(expect["perplexity"], rel=1e-6)


def test_experts_equal_the_in_memory_expanded_model(tiny, capsys):
    r = run_ppl(capsys, "--model", str(tiny["model"]), "--experts", str(tiny["experts"]), "--data",
                str(tiny["test"]), "--seq-len", str(SEQ), "--batch-size", "2")
    assert r["perplexity"] == tiny["expanded"]["perplexity"] != tiny["dense"]["perplexity"]
    a = r["artifact"]
    assert a["kind"] == "experts" and a["path"] == str(Path(tiny["experts"]).resolve())
    assert len(a["manifest_sha256"]) == 64 and len(a["calibration_data_sha256"]) == 64
    assert a["settings"]["num_clusters"] == 3 and a["calibration_data_sha256"] != r["data"]["sha256"]
    assert r["expert_usage"]["tokens"] == tiny["windows"].numel()
    # --model may be left out: the manifest names it
    r2 = run_ppl(capsys, "--experts", str(tiny["experts"]), "--data", str(tiny["test"]), "--seq-len", str(SEQ),
                 "--batch-size", "2")
    assert r2["perplexity"] == r["perplexity"]


def test_experts_streamed_equal_in_memory(tiny, capsys):
    base = ["--model", str(tiny["model"]), "--experts", str(tiny["experts"]), "--data", str(tiny["test"]),
            "--seq-len", str(SEQ), "--batch-size", "2"]
    r = run_ppl(capsys, *base, "--experts-streaming")
    assert r["perplexity"] == tiny["expanded"]["perplexity"] and r["experts_streaming"] is True
    assert r["expert_usage"]["tokens"] == tiny["windows"].numel()
    r2 = run_ppl(capsys, *base, "--experts-max-memory", "1KiB")  # below the experts' size: streamed
    assert r2["experts_streaming"] is True and r2["perplexity"] == r["perplexity"]
    assert r2["expert_usage"] == r["expert_usage"]
    r3 = run_ppl(capsys, *base, "--experts-max-memory", "100GiB")  # fits: in memory
    assert r3["experts_streaming"] is False and r3["perplexity"] == r["perplexity"]


def test_zero_thresholds_are_dense_and_report_sparsity(tiny, capsys):
    r = run_ppl(capsys, "--model", str(tiny["model"]), "--thresholds", "0,0,0", "--data", str(tiny["test"]),
                "--seq-len", str(SEQ), "--batch-size", "2")
    assert r["perplexity"] == tiny["dense"]["perplexity"]
    assert r["artifact"]["kind"] == "thresholds" and r["artifact"]["thresholds"] == [0.0, 0.0, 0.0]
    assert r["sparsity"]["tokens"] == tiny["windows"].numel() and len(r["sparsity"]["per_layer"]) == 3
    big = run_ppl(capsys, "--model", str(tiny["model"]), "--thresholds", "0.05,0.05,0.05", "--data",
                  str(tiny["test"]), "--seq-len", str(SEQ))
    assert big["sparsity"]["mean"] > r["sparsity"]["mean"] and big["perplexity"] != r["perplexity"]


@pytest.mark.parametrize("case, message", [
    ("missing data", "data file not found"),
    ("missing model", "--model"),
    ("missing experts", "experts directory not found"),
    ("wrong model", "num_layers=3"),
    ("wrong thresholds", "3 thresholds"),
    ("both", "not allowed with argument"),
    ("seq len", "--seq-len 1"),
    ("tokens", "--tokens 10"),
])
def test_bad_inputs_exit_2_with_one_line(tiny, capsys, case, message):
    base = {"--model": str(tiny["model"]), "--data": str(tiny["test"]), "--seq-len": str(SEQ)}
    extra: list[str] = []
    if case == "missing data":
        base["--data"] = str(tiny["root"] / "nope.txt")
    elif case == "missing model":
        base["--model"] = str(tiny["root"] / "no_model")
    elif case == "missing experts":
        extra = ["--experts", str(tiny["root"] / "no_experts")]
    elif case == "wrong model":
        base["--model"] = str(tiny["other"])
        extra = ["--experts", str(tiny["experts"])]
    elif case == "wrong thresholds":
        base["--model"] = str(tiny["other"])
        extra = ["--thresholds", "0,0,0"]
    elif case == "both":
        extra = ["--experts", str(tiny["experts"]), "--thresholds", "0,0,0"]
    elif case == "seq len":
        base["--seq-len"] = "1"
    elif case == "tokens":
        extra = ["--tokens", "10"]
    argv = ["ppl", "--quiet", *[x for kv in base.items() for x in kv], *extra]
    if case == "both":  # argparse's own error: exit 2, usage + one error line
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
        return
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.strip().splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("sparse-ffn: error: ") and message in err[0], err
    assert captured.out == ""
