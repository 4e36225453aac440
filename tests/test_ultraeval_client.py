"""UltraEval's real client code path against `sparse-ffn serve` (gunicorn) on loopback.

UltraEval (OpenBMB/UltraEval) is not on PyPI; its client behaviour is reimplemented here from
`models/general_model.py` (GeneralModel, concurrency 1: one module-level `data_prompt` whose params are
*updated* by every task and never cleared, `requests.post(...).json()` with no status check, one POST per
log-prob item holding `input + option` for each option), `tasks/postprocess.py` (`general_torch`,
`general_torch_ppl`: -sum per option, `general_torch_ppl_norm`: the options' common prefix dropped, then
-mean) and `metrics/log_prob.py` (argmin -> that option's target score). A log-prob item's context is
far over the tiny model's 512-token context: the server truncates it from the left, says so, counts it,
and the run finishes with the scores the truncated prompts give.
"""

from __future__ import annotations

import json

import pytest
import requests
import torch

from serve_helpers import serving
from sparse_ffn.artifacts.thresholds import ThresholdFile
from sparse_ffn.core.ffn import find_ffns, model_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")
LONG = "The quick brown fox jumps over the lazy dog. " * 120  # ~1300 tokens > 512
ITEMS = [  # UltraEval log-prob items: input, target_scores (option -> score)
    {"input": "The sun rises in the", "target_scores": {" east": 1, " west": 0, " sea": 0}},
    {"input": "Paris is the capital of", "target_scores": {" France": 1, " Spain": 0}},
    {"input": LONG + "Question: what jumps? Answer:", "target_scores": {" the fox": 1, " the dog": 0}},
    {"input": "Question: Which of these is a source of light? Answer:",
     "target_scores": {" The sun": 1, " The water": 0, " A stone": 0}},
]
GEN_INPUTS = ["The quick brown fox", "Good morning! How are you today?", LONG + "In the end"]


# -- UltraEval's client (models/general_model.py, concurrency 1) -------------------------------------
class GeneralModel:
    def __init__(self, url: str) -> None:
        self.url = url
        self.data_prompt = {"params": {}, "instances": []}  # module-level in UltraEval: piles up
        self.headers: list[dict] = []  # what the server said (UltraEval ignores it)

    def _post_request(self, data: list[str]):
        self.data_prompt["instances"] = data
        r = requests.post(self.url, data=json.dumps(self.data_prompt), headers={"Content-Type": "application/json"},
                          timeout=120)
        self.headers.append(dict(r.headers))
        return r.json()  # no status check, as UltraEval

    def loglikelihood(self, params: dict, items: list[dict]) -> list:
        self.data_prompt["params"].update(params)
        return [self._post_request([it["input"] + o for o in it["target_scores"]]) for it in items]

    def generate(self, params: dict, inputs: list[str]):
        self.data_prompt["params"].update(params)
        return self._post_request(inputs)


def general_torch(result):  # tasks/postprocess.py GeneralTorch
    return result if isinstance(result, list) else [result]


def general_torch_ppl(result):
    return [[-sum(inner) for inner in outer] for outer in result]


def general_torch_ppl_norm(result):
    out = []
    for inner_lists in result:
        prefix = []
        for items in zip(*inner_lists):
            if all(x == items[0] for x in items):
                prefix.append(items[0])
            else:
                break
        out.append([-(sum(lst[len(prefix):]) / len(lst[len(prefix):])) for lst in inner_lists])
    return out


def log_prob_metric(item: dict, scores: list[float]) -> float:  # metrics/log_prob.py (no ties here)
    best = min(range(len(scores)), key=lambda i: scores[i])
    return list(item["target_scores"].values())[best]


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    import transformers

    from sparse_ffn.model_adapters.sparsity_setup import resolve_sparsity

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ffns = find_ffns(model)
    thr = tmp_path_factory.mktemp("thr") / "thr.json"
    ThresholdFile(thresholds=[5e-4] * len(ffns),
                  model={"name_or_path": str(tiny_llama_dir), **model_fingerprint(model, ffns)}).save(thr)
    resolve_sparsity(str(thr)).apply(model)  # the reference: the same sparsity, one sequence at a time
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    return thr, model, tok


def reference_logprobs(model, tok, text: str, keep: int = 512) -> list[float]:
    ids = torch.tensor([tok(text)["input_ids"][-keep:]])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return lp.gather(-1, ids[0, 1:, None])[:, 0].tolist()


def test_ultraeval_client_runs_generation_then_logprob_tasks_with_an_overlong_prompt(setup):
    thr, model, tok = setup
    with serving(["--thresholds", str(thr), "--dtype", "float32", "--max-batch", "3"]) as (base, log):
        client = GeneralModel(base + "/infer")
        # task 1: generation with UltraEval's models/model_params/vllm_sample.json (sampling)
        sample = client.generate({"temperature": 0.3, "top_p": 0.8, "max_tokens": 300, "sampling_num": 1},
                                 GEN_INPUTS[:2])
        assert [type(s) for s in general_torch(sample)] == [str, str]
        # task 2: greedy generation; params pile up (top_p 0.8 stays), one prompt over the context
        greedy = general_torch(client.generate({"temperature": 0, "max_tokens": 8}, GEN_INPUTS))
        assert len(greedy) == 3 and all(isinstance(s, str) for s in greedy)
        for prompt, text in zip(GEN_INPUTS, greedy):
            ids = torch.tensor([tok(prompt)["input_ids"][-(512 - 8):]])  # left-truncated: room for 8 tokens
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
            new = out[0, ids.shape[1]:].tolist()
            new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
            assert text == tok.decode(ids[0].tolist() + new, skip_special_tokens=True)[
                len(tok.decode(ids[0].tolist(), skip_special_tokens=True)):], prompt[-30:]
        assert json.loads(client.headers[-1]["X-Sparse-FFN-Truncated"]) == [
            {"instance": 2, "tokens": len(tok(GEN_INPUTS[2])["input_ids"]), "kept": 504}]
        assert client.headers[-1].get("X-Sparse-FFN-Ignored-Params") is None  # sampling_num is UltraEval's
        requests.post(base + "/stats/reset", timeout=30)

        # tasks 3 and 4: log-prob tasks (prompt_logprobs piled onto the sampling params)
        result = client.loglikelihood({"prompt_logprobs": 0, "max_tokens": 1}, ITEMS)
        assert client.data_prompt["params"] == {"temperature": 0, "top_p": 0.8, "max_tokens": 1, "sampling_num": 1,
                                                "prompt_logprobs": 0}
        stats = requests.get(base + "/stats", timeout=30).json()
    assert "kept its last 512" in "".join(log)

    expected = [[reference_logprobs(model, tok, it["input"] + o) for o in it["target_scores"]] for it in ITEMS]
    for got_item, ref_item in zip(result, expected):
        for got, ref in zip(got_item, ref_item):
            assert len(got) == len(ref) and got == pytest.approx(ref, abs=1e-5)
    assert all(len(v) == 511 for v in result[2])  # the over-long item: its last 512 tokens
    for post in (general_torch_ppl, general_torch_ppl_norm):
        scores, ref_scores = post(result), post(expected)
        assert [s == pytest.approx(r, abs=1e-4) for s, r in zip(scores, ref_scores)] == [True] * len(ITEMS)
        accuracy = sum(log_prob_metric(it, s) for it, s in zip(ITEMS, scores)) / len(ITEMS)
        assert accuracy == sum(log_prob_metric(it, s) for it, s in zip(ITEMS, ref_scores)) / len(ITEMS)
    # counted: one request per item, every option, the truncated ones and the tokens they lost
    n_opts = [len(it["target_scores"]) for it in ITEMS]
    assert stats["requests"] == len(ITEMS) and stats["instances"] == sum(n_opts)
    long_lengths = [len(tok(ITEMS[2]["input"] + o)["input_ids"]) for o in ITEMS[2]["target_scores"]]
    assert stats["truncated"] == {"instances": 2, "tokens": sum(n - 512 for n in long_lengths)}
    distinct = [{tuple(tok(it["input"] + o)["input_ids"][-512:][:-1]) for o in it["target_scores"]} for it in ITEMS]
    assert stats["sparsity"]["tokens"] == sum(len(x) for d in distinct for x in d)  # each distinct input once
