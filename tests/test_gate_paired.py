"""`sparse-ffn gate` paired over items, on real `lm_eval --log_samples` outputs of the tiny model.

The candidate is mostly a copy of the dense run with k items' 0/1 accuracy flipped (samples file and
results JSON edited together, as a run that scored those items differently would write them), so every
paired number has a value known in advance; the expected values are computed here by hand.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest

from conftest import read_results, read_samples
from test_gate import TASKS, dense_and_cett_runs, gate

Z975, Z80 = statistics.NormalDist().inv_cdf(0.975), statistics.NormalDist().inv_cdf(0.8)


@pytest.fixture(scope="module")
def logged(tiny_llama_dir, local_tasks, tmp_path_factory) -> dict[str, Path]:
    """Output dirs of one dense and one cett `lm_eval --model sparse_ffn --log_samples` run (concurrently)."""
    return dense_and_cett_runs(tmp_path_factory.mktemp("paired_runs"), tiny_llama_dir, local_tasks, log_samples=True)


def results_file(out_dir: Path) -> Path:
    return next(Path(out_dir).rglob("results_*.json"))


def samples_file(out_dir: Path, task: str) -> Path:
    return next(Path(out_dir).rglob(f"samples_{task}_*.jsonl"))


def acc_values(out_dir: Path, task: str) -> list[float]:
    """Per-item acc in doc_id order (the order the gate pairs and resamples items in)."""
    return [s["acc"] for s in read_samples(out_dir, task)]


def copy_run(src: Path, dst: Path, flips: dict[str, list[int]] | None = None, edit_line=None) -> Path:  # noqa: ANN001
    """Copy an lm_eval output dir; flip the 0/1 `acc` of the given doc_ids per task in the samples file and
    set the results JSON's acc and its stderr (lm-eval's sd/sqrt(n)) to the edited items'; `edit_line(task,
    sample)` may alter samples further."""
    shutil.copytree(src, dst)
    res_path = results_file(dst)
    res = json.loads(res_path.read_text())
    for task in TASKS:
        path = samples_file(dst, task)
        lines = [json.loads(t) for t in path.read_text().splitlines()]
        for s in lines:
            if s["doc_id"] in (flips or {}).get(task, []):
                s["acc"] = 1.0 - s["acc"]
            if edit_line is not None:
                edit_line(task, s)
        lines = [s for s in lines if not s.pop("_drop", False)]
        path.write_text("".join(json.dumps(s) + "\n" for s in lines))
        acc = [s["acc"] for s in lines]
        res["results"][task]["acc,none"] = sum(acc) / len(acc)
        res["results"][task]["acc_stderr,none"] = statistics.stdev(acc) / math.sqrt(len(acc))
    res_path.write_text(json.dumps(res, indent=2))
    return dst


def check(report: dict, task: str, metric: str) -> dict:
    return next(c for c in report["checks"] if c["task"] == task and c["metric"] == metric)


@pytest.fixture(scope="module")
def flipped(logged, tmp_path_factory) -> tuple[Path, dict[str, list[int]]]:
    """The dense run with piqa acc: 3 items right->wrong, 1 wrong->right; arc_easy acc: 6 wrong->right."""
    piqa, arc = acc_values(logged["dense"], "piqa_local"), acc_values(logged["dense"], "arc_easy_local")
    right = [i for i, v in enumerate(piqa) if v == 1]
    wrong = [i for i, v in enumerate(piqa) if v == 0]
    arc_wrong = [i for i, v in enumerate(arc) if v == 0]
    assert len(right) >= 3 and len(wrong) >= 1 and len(arc_wrong) >= 6, (piqa, arc)  # the tiny model's answers
    flips = {"piqa_local": right[:3] + wrong[:1], "arc_easy_local": arc_wrong[:6]}
    return copy_run(logged["dense"], tmp_path_factory.mktemp("flipped") / "run", flips), flips


def hand_mcnemar(b: int, c: int) -> float:
    """Two-sided exact binomial test of b out of b + c at 1/2, written out: 2 * P(X <= min(b, c)), at most 1."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n)


def hand_bootstrap(d: np.ndarray, seed: int = 0, resamples: int = 10_000, confidence: float = 0.95):
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    return tuple(np.quantile(means, [(1 - confidence) / 2, 1 - (1 - confidence) / 2]))


def test_flipped_items_paired_difference_ci_mcnemar_mde(logged, flipped, tmp_path):
    cand, _ = flipped
    summary = tmp_path / "r.md"
    code, report, out, _ = gate("--baseline", logged["dense"], "--candidate", cand, "--max-drop", "acc=0.3",
                                "--summary", summary)
    assert code == 0 and report["comparison"] == "paired" and report["verdict"] == "passed"
    c = check(report, "piqa_local", "acc")
    base, new = np.array(acc_values(logged["dense"], "piqa_local")), np.array(acc_values(cand, "piqa_local"))
    d = new - base
    assert sorted(d.tolist()) == [-1, -1, -1, 0, 0, 0, 0, 1]
    assert c["method"] == "paired" and c["n"] == 8 and (c["b"], c["c"]) == (3, 1) and c["test"] == "mcnemar"
    assert c["diff"] == pytest.approx(-0.25)
    se = statistics.stdev(d.tolist()) / math.sqrt(8)  # sqrt((3 * 0.75^2 + 4 * 0.25^2 + 1.25^2) / 7 / 8)
    assert c["se"] == pytest.approx(se) and se == pytest.approx(0.25)
    assert (c["ci_low"], c["ci_high"]) == pytest.approx(hand_bootstrap(d), abs=1e-12)
    assert c["ci_low"] < -0.25 < c["ci_high"]
    assert c["p_value"] == pytest.approx(hand_mcnemar(3, 1)) and hand_mcnemar(3, 1) == pytest.approx(10 / 16)
    assert c["mde"] == pytest.approx((Z975 + Z80) * se)
    assert c["passed"] is True and c["decided_on"] == "point"
    arc = check(report, "arc_easy_local", "acc")
    assert (arc["b"], arc["c"]) == (0, 6) and arc["diff"] == pytest.approx(0.75)
    assert arc["p_value"] == pytest.approx(hand_mcnemar(0, 6)) == pytest.approx(2 / 64)
    for task in TASKS:  # acc_norm untouched: no discordant item
        n = check(report, task, "acc_norm")
        assert n["method"] == "paired" and n["diff"] == 0 and (n["b"], n["c"], n["p_value"]) == (0, 0, 1.0)
    assert f"mde {c['mde']:.4f}" in out and "mcnemar p=0.6250 (b=3, c=1)" in out
    assert out.splitlines()[0].startswith("comparison: paired")
    md = summary.read_text()
    assert f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]" in md and "paired (n=8)" in md


def test_decide_upper_fails_where_the_point_estimate_passes(logged, flipped):
    cand, _ = flipped
    args = ("--baseline", logged["dense"], "--candidate", cand, "--max-drop", "acc=0.3")
    code, report, out, _ = gate(*args, "--decide", "upper")
    c = check(report, "piqa_local", "acc")
    d = np.array(acc_values(cand, "piqa_local")) - np.array(acc_values(logged["dense"], "piqa_local"))
    lo, _ = hand_bootstrap(d)
    assert c["drop_upper"] == pytest.approx(-lo) and -lo > 0.3  # the point drop 0.25 is within 0.3
    assert code == 1 and c["passed"] is False and c["decided_on"] == "upper"
    assert c["within_noise"] is True and c["note"] == "within noise"  # McNemar p = 0.625
    assert check(report, "arc_easy_local", "acc")["passed"] is True  # an improvement
    assert "upper end of the two-sided 95% CI" in out
    # a wider CI at 99% moves the bound out further
    _, report99, _, _ = gate(*args, "--decide", "upper", "--confidence", "0.99")
    c99 = check(report99, "piqa_local", "acc")
    assert c99["drop_upper"] == pytest.approx(-hand_bootstrap(d, confidence=0.99)[0])
    assert c99["drop_upper"] >= c["drop_upper"]


def test_holm_adjusts_the_paired_p_values(logged, flipped):
    """Swapped: the flipped run is the baseline, so arc_easy acc drops by 0.75 (b=6, c=0; p=1/32)."""
    cand, _ = flipped
    args = ("--baseline", cand, "--candidate", logged["dense"], "--max-drop", "acc=0.3")
    code, report, _, _ = gate(*args)
    arc = check(report, "arc_easy_local", "acc")
    assert code == 1 and (arc["b"], arc["c"]) == (6, 0) and arc["p_value"] == pytest.approx(1 / 32)
    assert arc["within_noise"] is False and arc["p_holm"] is None  # significant at 0.05 unadjusted
    code, report, out, _ = gate(*args, "--holm")
    rows = [c for c in report["checks"] if c["method"] == "paired"]
    p = [c["p_value"] for c in rows]
    assert len(rows) == 4 and sorted(p) == pytest.approx([1 / 32, hand_mcnemar(1, 3), 1.0, 1.0])
    order = sorted(range(4), key=lambda i: p[i])  # Holm by hand: running max of (m - rank) * p, capped at 1
    expected, running = [0.0] * 4, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (4 - rank) * p[i]))
        expected[i] = running
    assert [c["p_holm"] for c in rows] == pytest.approx(expected)
    arc = check(report, "arc_easy_local", "acc")
    assert arc["p_holm"] == pytest.approx(4 / 32) and arc["within_noise"] is True and code == 1
    assert "Holm 0.1250" in out


def test_real_sparse_run_pairs_with_its_dense_twin(logged, tmp_path):
    plot, summary = tmp_path / "r.png", tmp_path / "r.md"
    code, report, out, _ = gate("--baseline", logged["dense"], "--candidate", logged["cett"], "--max-drop", "",
                                "--plot", plot, "--summary", summary)
    assert code == 0 and report["verdict"] == "not gated" and report["passed"] is True
    assert report["comparison"] == "paired" and report["warnings"] == []
    assert report["samples"]["candidate"]["piqa_local"] == str(samples_file(logged["cett"], "piqa_local"))
    dense, cett = read_results(logged["dense"]), read_results(logged["cett"])
    for task in TASKS:
        for metric in ("acc", "acc_norm"):
            b = np.array([s[metric] for s in read_samples(logged["dense"], task)])
            c = np.array([s[metric] for s in read_samples(logged["cett"], task)])
            row, key = check(report, task, metric), f"{metric},none"
            assert row["n"] == 8 and row["b"] == int(((b == 1) & (c == 0)).sum())
            assert row["c"] == int(((b == 0) & (c == 1)).sum())
            assert row["diff"] == pytest.approx(cett["results"][task][key] - dense["results"][task][key])
            assert row["se"] == pytest.approx(statistics.stdev((c - b).tolist()) / math.sqrt(8))
            assert row["se"] < math.hypot(row["baseline_se"], row["candidate_se"])  # the runs agree on most items
    assert out.splitlines()[-2] == "gate: not gated (no budget set)"  # the JSON object follows
    md = summary.read_text()
    assert md.startswith("## sparse-ffn gate: ➖ not gated (no budget set)") and "PASSED" not in md
    sp = cett["config"]["sparse_ffn"]["sparsity"]
    assert 0.05 < sp["mean"] < 0.95
    assert report["sparsity"]["candidate"] == {"mean": sp["mean"], "per_layer": sp["per_layer"]}
    assert f"| candidate | {sp['mean']:.4f} | " + ", ".join(f"{v:.3f}" for v in sp["per_layer"]) + " |" in md
    assert "| baseline | 0.0000 |" in md
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparse-ffn: error: "), err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def test_altered_or_missing_documents_are_refused(logged, flipped, tmp_path):
    cand, _ = flipped
    victim = read_samples(logged["dense"], "piqa_local")[5]["doc_id"]

    def alter(task, s):
        if task == "piqa_local" and s["doc_id"] == victim:
            s["doc"]["goal"] += " (edited)"  # lm-eval's doc_hash left as it was

    altered = copy_run(cand, tmp_path / "altered", edit_line=alter)
    code, _, out, err = gate("--baseline", logged["dense"], "--candidate", altered)
    one_line_error(code, err, str(samples_file(altered, "piqa_local")), f"task piqa_local: doc_id {victim}:",
                   "document differs")
    assert out == ""

    def drop(task, s):
        if task == "arc_easy_local" and s["doc_id"] == 7:
            s["_drop"] = True

    fewer = copy_run(cand, tmp_path / "fewer", edit_line=drop)
    code, _, _, err = gate("--baseline", logged["dense"], "--candidate", fewer)
    one_line_error(code, err, str(samples_file(logged["dense"], "arc_easy_local")), "task arc_easy_local: doc_id 7 ",
                   "not in the candidate's samples", "1 item(s) unmatched")


def test_unpaired_fallback_and_explicit_samples(logged, flipped, tmp_path):
    cand, _ = flipped
    alone = tmp_path / "alone" / "results_2030-01-01T00-00-00.000000.json"  # no samples beside it
    alone.parent.mkdir()
    shutil.copy(results_file(cand), alone)
    summary = tmp_path / "r.md"
    code, report, out, err = gate("--baseline", logged["dense"], "--candidate", alone, "--max-drop", "acc=0.3",
                                  "--summary", summary)
    assert code == 0 and report["comparison"] == "unpaired"
    c = check(report, "piqa_local", "acc")
    assert c["method"] == "unpaired" and c["n"] is None and c["b"] is None and c["p_value"] is None
    assert c["se"] == pytest.approx(math.hypot(c["baseline_se"], c["candidate_se"]))
    assert (c["ci_low"], c["ci_high"]) == pytest.approx((-0.25 - Z975 * c["se"], -0.25 + Z975 * c["se"]))
    assert c["mde"] == pytest.approx((Z975 + Z80) * c["se"])
    assert any("per-sample log only in the baseline" in w for w in report["warnings"])
    assert out.splitlines()[0].startswith("comparison: unpaired")
    assert "Comparison: unpaired" in summary.read_text()
    # the same results file with its samples named explicitly: paired again
    code, report, _, _ = gate("--baseline", logged["dense"], "--candidate", alone, "--max-drop", "acc=0.3",
                              "--candidate-samples", *(samples_file(cand, t) for t in TASKS))
    c = check(report, "piqa_local", "acc")
    assert report["comparison"] == "paired" and (c["b"], c["c"]) == (3, 1) and report["warnings"] == []


def test_results_that_disagree_with_their_samples_are_compared_unpaired(logged, flipped, tmp_path):
    cand, _ = flipped
    odd = tmp_path / "odd"
    shutil.copytree(cand, odd)
    path = results_file(odd)
    data = json.loads(path.read_text())
    data["results"]["piqa_local"]["acc,none"] = 0.5  # the samples average 0.25
    path.write_text(json.dumps(data))
    code, report, _, _ = gate("--baseline", logged["dense"], "--candidate", odd)
    c = check(report, "piqa_local", "acc")
    assert c["method"] == "unpaired" and "do not average to the results' values" in c["note"]
    assert check(report, "arc_easy_local", "acc")["method"] == "paired" and report["comparison"] == "mixed"


def test_bad_options_and_samples_exit_2(logged, tmp_path):
    base = ("--baseline", logged["dense"], "--candidate", logged["cett"])
    code, _, _, err = gate(*base, "--confidence", "1.5")
    one_line_error(code, err, "--confidence: must be between 0 and 1")
    code, _, _, err = gate(*base, "--candidate-samples", tmp_path / "nope")
    one_line_error(code, err, str(tmp_path / "nope"), "not found (--candidate-samples)")
    bad = tmp_path / "samples_piqa_local_2030-01-01T00-00-00.jsonl"
    bad.write_text(samples_file(logged["cett"], "piqa_local").read_text().splitlines()[0] + "\n{oops\n")
    code, _, _, err = gate(*base, "--candidate-samples", bad)
    one_line_error(code, err, f"{bad}: line 2: not valid JSON")
    named = tmp_path / "piqa.jsonl"
    named.write_text("")
    code, _, _, err = gate(*base, "--candidate-samples", named)
    one_line_error(code, err, f"{named}: not named samples_<task>_<timestamp>.jsonl")


def test_statistics_in_process(monkeypatch):
    from sparse_ffn.analysis import paired

    for b, c in ((0, 0), (3, 1), (0, 6), (5, 5), (2, 9), (17, 4)):
        base = np.array([1] * b + [0] * c + [1, 0])
        cand = np.array([0] * b + [1] * c + [1, 0])
        assert paired.mcnemar_exact(base, cand) == (b, c, pytest.approx(hand_mcnemar(b, c)))
    p = [0.01, 0.04, 0.03, 0.5]  # Holm by hand: sorted 0.01, 0.03, 0.04, 0.5 -> 0.04, 0.09, 0.09, 0.5
    assert paired.holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    d = np.random.default_rng(7).normal(size=37)
    whole = paired.bootstrap_ci(d, 0.9, resamples=1001, seed=3)
    monkeypatch.setattr(paired, "BOOTSTRAP_CHUNK_ELEMENTS", 37 * 10)  # 10 rows per chunk: same numbers
    assert paired.bootstrap_ci(d, 0.9, resamples=1001, seed=3) == whole
    assert whole == pytest.approx(hand_bootstrap(d, seed=3, resamples=1001, confidence=0.9), abs=1e-12)
    st = paired.paired_stats(np.zeros(37), d, confidence=0.9, resamples=1001, seed=3)  # not 0/1: paired t
    t = float(np.mean(d)) / (statistics.stdev(d.tolist()) / math.sqrt(37))
    from scipy import stats

    assert st.test == "paired t" and st.b is None and st.p_value == pytest.approx(2 * stats.t.sf(abs(t), 36))
    assert (st.ci_low, st.ci_high) == whole
    assert paired.document_hash({"b": 1, "a": "é"}) == paired.document_hash({"a": "é", "b": 1})
