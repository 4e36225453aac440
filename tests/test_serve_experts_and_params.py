"""`sparse-ffn serve --experts` against the lm-eval adapter, and vLLM's SamplingParams paths on loopback:
beam search against Hugging Face's, presence/frequency penalties against a plain greedy loop, the
answer shapes of `n` / `best_of`, and the combinations vLLM refuses (400, nothing counted)."""

from __future__ import annotations

import pytest
import torch
import transformers

from serve_helpers import http, in_thread, serving
from sparse_ffn.artifacts.data import token_windows
from sparse_ffn.calibrate.experts import ExpertsSettings, calibrate_experts
from tiny import CORPUS, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
PAIRS = [("The sun rises in the", " east"), ("Paris is the capital of", " France"), ("Hello", " world"),
         ("Water boils at one hundred", " degrees at sea level"), ("She put the cup on the", " table")]
PROMPTS = ["The quick brown fox", "Good morning! How are you today?", "Water boils at"]


@pytest.fixture(scope="module")
def expanded(tmp_path_factory):
    """(model dir, experts dir): a tiny Llama with K=4 experts at 50% on every FFN linear."""
    root = tmp_path_factory.mktemp("serve_experts")
    model_dir = make_tiny_model("llama", root / "llama")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    res = calibrate_experts(model, token_windows(tok, CORPUS * 8, 32, 6 * 32),
                            ExpertsSettings(num_clusters=4, sparsity=0.5, kmeans_restarts=2), root / "k4",
                            progress=False, batch_size=4)
    return model_dir, res.path


def test_serve_experts_logprobs_and_usage_equal_the_lm_eval_adapter(expanded):
    from lm_eval.api.instance import Instance

    from sparse_ffn.model_adapters.lm_eval_adapter import SparseFFNLM

    model_dir, experts = expanded
    adapter = SparseFFNLM(experts=str(experts), device="cpu", batch_size=4, max_length=512, dtype="float32")
    reference = adapter.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)])
    info = adapter.get_model_info()["sparse_ffn"]
    with serving(["--experts", str(experts), "--dtype", "float32", "--max-batch", "2"]) as (base, _):
        status, served, _ = http(base + "/infer", {"params": {"prompt_logprobs": 0, "max_tokens": 1},
                                                   "instances": [c + x for c, x in PAIRS]})
        assert status == 200, served
        stats = http(base + "/stats")[1]
    for (ctx, cont), values, (ll, _) in zip(PAIRS, served, reference):
        n_cont = len(adapter.tok_encode(ctx + cont)) - len(adapter.tok_encode(ctx))
        assert len(values) == len(adapter.tok_encode(ctx + cont)) - 1
        assert sum(values[-n_cont:]) == pytest.approx(ll, abs=1e-5), (ctx, cont)
    assert stats["experts_source"] == str(experts) and stats["model"] == str(model_dir)  # the model from the manifest
    # the same tokens routed to the same experts: usage identical, and counted for every input token
    assert stats["expert_usage"] == info["expert_usage"]
    assert stats["expert_usage"]["tokens"] == sum(len(adapter.tok_encode(c + x)) - 1 for c, x in PAIRS) > 0
    assert stats["sparsity"]["tokens"] == info["sparsity"]["tokens"]


# -- vLLM's SamplingParams paths, on the in-process server over loopback -----------------------------
@pytest.fixture(scope="module")
def server(expanded):
    from sparse_ffn.model_adapters.ultraeval_server import create_app

    app = create_app(None, experts=str(expanded[1]), dtype="float32", device="cpu", max_batch=4)
    with in_thread(app) as base:
        yield base, app


def infer(base: str, prompts: list[str], **params):
    status, out, _ = http(base + "/infer", {"params": params, "instances": prompts})
    assert status == 200, out
    return out


def new_tokens(tok, ids: torch.Tensor, out: torch.Tensor) -> list[int]:
    new = out[ids.shape[1]:].tolist()
    return new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new


def test_beam_search_equals_hugging_face_beams(server):
    """Beams end at different lengths (a frequent token is a stop token), so length_penalty matters."""
    base, app = server
    tok = app.tokenizer
    changed = 0
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            greedy = app.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                        pad_token_id=app.pad_id)[0, ids.shape[1]:].tolist()
        stop_id = max(set(greedy[1:]), key=greedy[1:].count)  # a token the beams are likely to produce
        stops = [tok.eos_token_id, stop_id]
        answers = {}
        for penalty, early in ((1.0, False), (-2.0, True), (3.0, "never")):
            served = infer(base, [prompt], use_beam_search=True, best_of=4, n=3, temperature=0, max_tokens=10,
                           length_penalty=penalty, early_stopping=early, stop_token_ids=[stop_id])
            with torch.no_grad():
                out = app.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, num_beams=4,
                                         num_return_sequences=3, do_sample=False, length_penalty=penalty,
                                         early_stopping=early, pad_token_id=app.pad_id, eos_token_id=stops)
            expected = []
            for row in out:
                new = row[ids.shape[1]:].tolist()
                cut = min([new.index(s) for s in stops if s in new], default=len(new))
                expected.append(tok.decode(new[:cut], skip_special_tokens=True))
            assert served == [expected], (prompt, penalty, early)  # one prompt -> a list of n=3 beams, best first
            answers[penalty] = served
        changed += answers[-2.0] != answers[3.0]
    assert changed  # the length penalty reorders or changes the beams somewhere


def greedy_with_penalties(app, prompt: str, steps: int, presence: float, frequency: float) -> str:
    """vLLM: logits -= frequency * count + presence * (count > 0), over the generated tokens only."""
    tok = app.tokenizer
    ids = tok(prompt)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = app.model(torch.tensor([ids + new])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(new, dtype=torch.long), minlength=logits.numel()).float()
            logits = logits - frequency * counts - presence * (counts > 0).float()
            nxt = int(logits.argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True)


def test_presence_and_frequency_penalties_equal_a_plain_greedy_loop(server):
    base, app = server
    plain = infer(base, PROMPTS, temperature=0, max_tokens=12)
    for presence, frequency in ((0.0, 1.5), (1.0, 0.0), (0.5, 0.8), (0.0, -1.0), (-1.0, 0.3)):
        served = infer(base, PROMPTS, temperature=0, max_tokens=12, presence_penalty=presence,
                       frequency_penalty=frequency)
        assert served == [greedy_with_penalties(app, p, 12, presence, frequency) for p in PROMPTS]
    assert plain == [greedy_with_penalties(app, p, 12, 0.0, 0.0) for p in PROMPTS]
    # the tiny random model repeats itself: the penalties must have changed something
    assert infer(base, PROMPTS, temperature=0, max_tokens=12, frequency_penalty=1.5) != plain


def sampled_and_ranked(app, prompts: list[str], *, seed: int, k: int, max_new: int) -> list[list[str]]:
    """Hugging Face's sampling of k sequences per prompt (one left-padded batch, the server's order and
    seed), each prompt's sorted by the cumulative log-probability of its tokens, best first (vLLM)."""
    tok = app.tokenizer
    ids = [tok(p)["input_ids"] for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    width = max(map(len, ids))
    tokens = torch.full((len(ids), width), app.pad_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, i in enumerate(order):
        tokens[row, width - len(ids[i]):], mask[row, width - len(ids[i]):] = torch.tensor(ids[i]), 1
    torch.manual_seed(seed)
    with torch.no_grad():
        out = app.model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=max_new, do_sample=True,
                                 temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=k, pad_token_id=app.pad_id,
                                 eos_token_id=[tok.eos_token_id], output_scores=True, return_dict_in_generate=True)
        scores = app.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    answers: list = [None] * len(ids)
    for row, i in enumerate(order):
        cands = []
        for r in range(row * k, (row + 1) * k):
            new = out.sequences[r, width:].tolist()
            n = new.index(tok.eos_token_id) if tok.eos_token_id in new else len(new)
            cands.append((-float(scores[r, :n].sum()), r, tok.decode(new[:n], skip_special_tokens=True)))
        answers[i] = [text for _, _, text in sorted(cands)]
    return answers


def test_n_and_best_of_answer_shapes_and_ranking(server):
    base, app = server
    one = infer(base, PROMPTS[:2], temperature=1.0, max_tokens=6, seed=7)
    assert all(isinstance(a, str) for a in one)  # n == 1: a string per prompt
    three = infer(base, PROMPTS[:2], temperature=1.0, max_tokens=6, seed=7, n=3)
    assert [len(a) for a in three] == [3, 3] and all(isinstance(s, str) for a in three for s in a)
    # best_of=4, n=2 answers the two best of the same four candidates that n=4 (best_of=4) lists, best first
    four = infer(base, PROMPTS[:2], temperature=1.0, max_tokens=6, seed=7, n=4, best_of=4)
    two = infer(base, PROMPTS[:2], temperature=1.0, max_tokens=6, seed=7, n=2, best_of=4)
    assert [len(a) for a in four] == [4, 4] and two == [a[:2] for a in four]
    assert len({s for a in four for s in a}) > 2  # sampled: the candidates differ
    assert four == sampled_and_ranked(app, PROMPTS[:2], seed=7, k=4, max_new=6)
    assert infer(base, PROMPTS[:2], temperature=1.0, max_tokens=6, seed=7, n=4, best_of=4) == four  # seeded


@pytest.mark.parametrize("params, needle", [
    ({"use_beam_search": True, "best_of": 3, "temperature": 0.7}, "temperature"),
    ({"use_beam_search": True, "temperature": 0}, "best_of"),  # beam width 1
    ({"use_beam_search": True, "best_of": 3, "temperature": 0, "top_k": 5}, "top_p/top_k/min_p"),
    ({"n": 3, "best_of": 2, "temperature": 1.0}, "best_of=2"),
    ({"n": 2, "temperature": 0}, "greedy"),
    ({"length_penalty": 0.5, "temperature": 0}, "length_penalty"),
    ({"early_stopping": True, "temperature": 0}, "early_stopping"),
    ({"early_stopping": "sometimes", "use_beam_search": True, "best_of": 2, "temperature": 0}, "early_stopping"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"n": 0}, "params.n"),
    ({"best_of": True}, "best_of"),
    ({"logprobs": 5}, "not supported"),
])
def test_vllm_refusals_are_400_and_count_nothing(server, params, needle):
    base, _ = server
    before = http(base + "/stats")[1]
    status, answer, _ = http(base + "/infer", {"params": {"max_tokens": 4, **params}, "instances": ["Hello"]})
    assert status == 400 and needle in answer["error"], (params, status, answer)
    assert http(base + "/stats")[1] == before
