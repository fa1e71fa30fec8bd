"""OpenAI-compatible chat-completions backend (``vllm serve``, or a hosted API).

Input: chat prompts; the server applies its chat template (or the recipe's, sent as
``chat_template`` with every request, which vLLM servers honour). Each request carries its
prompt's seed. Output:
``Completion`` lists (token ids when the server returns them, as vLLM does
with ``return_token_ids``). All prompts of a call are sent concurrently, at
most ``max_concurrency`` requests in flight. 429, 5xx, timeouts and dropped
connections are retried with exponential backoff (``Retry-After`` honoured);
other 4xx answers are errors that quote the server's message. Each retry is logged (attempt,
wait, error); a server that stays unreachable or failing ends in ``OpenAIServerError``, a user
error (``BadInput``), so the CLI prints it as one line, not a traceback. A vLLM server cuts a stop
string from the text but not from the token ids; they are cut here with the model's tokenizer
(``trim_at_stop``), or dropped when it cannot be loaded, so the ids always match the text.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from collections.abc import Sequence

from posttrain.core.errors import BadInput
from posttrain.core.sampling.base import (Completion, Messages, SamplerConfig, SamplingParams, prompt_seeds,
                                          trim_at_stop)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

log = logging.getLogger("posttrain")


class OpenAIServerError(BadInput, RuntimeError):
    """The server rejected a request (4xx other than rate limits) or kept failing after retries.

    A ``BadInput`` (the CLI prints one line: a dead server or wrong URL is the user's to fix, not a
    bug); still a ``RuntimeError`` for callers that caught it as one.
    """


def _raise_on_broken_pipe() -> None:
    """Make a write to a connection the server dropped raise (``BrokenPipeError``, retried), not kill the process.

    ``posttrain`` (the CLI) restores SIGPIPE's default action so that ``posttrain keys | head`` ends
    quietly; under that default, sending a request body into a socket a crashed server has reset
    kills the whole run silently (exit -13, no log line, no error). Only the main thread may set a
    handler; a process that chose its own SIGPIPE handler keeps it.
    """
    if hasattr(signal, "SIGPIPE") and threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL:
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)


class OpenAISampler:
    """Sampler talking to ``{base_url}/chat/completions``."""

    name = "openai"

    def __init__(self, cfg: SamplerConfig, model: str | None = None, chat_template: str | None = None,
                 tokenizer: str | None = None):
        self.cfg = cfg
        self.tokenizer_name = tokenizer or model  # only to cut the token ids of a stop string
        self._tokenizer = None
        self.chat_template = chat_template
        self.model = cfg.served_model_name or model
        if not self.model:
            raise ValueError("sampler backend 'openai' needs served_model_name (or a model) to put in requests")
        key = os.environ.get(cfg.api_key_env, "EMPTY")
        self.client = httpx.Client(base_url=cfg.base_url.rstrip("/"), timeout=cfg.timeout_s,
                                   headers={"Authorization": f"Bearer {key}"},
                                   limits=httpx.Limits(max_connections=cfg.max_concurrency))
        self.retries = 0  # total retried requests, for monitoring
        _raise_on_broken_pipe()

    def _body(self, prompt: Messages, params: SamplingParams, seed: int | None = None) -> dict:
        body: dict = {"model": self.model, "messages": prompt, "n": params.n, "temperature": params.temperature,
                      "top_p": params.top_p, "max_tokens": params.max_tokens}
        if params.stop:
            body["stop"] = params.stop
        if seed is not None:
            body["seed"] = seed
        if self.chat_template:
            body["chat_template"] = self.chat_template
        if params.logprobs:
            body["logprobs"] = True
        if self.cfg.request_token_ids:
            body["return_token_ids"] = True
        body.update(self.cfg.extra_body)
        return body

    def _post(self, body: dict) -> dict:
        delay = 1.0
        for attempt in range(self.cfg.max_retries + 1):
            try:
                r = self.client.post("/chat/completions", json=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                err = " ".join(f"{type(e).__name__}: {e}".split()).rstrip(":")  # one line; some have no message
            else:
                if r.status_code == 200:
                    return r.json()
                err = f"HTTP {r.status_code}: {' '.join(r.text[:300].split())}"  # one line, for the CLI
                if r.status_code not in RETRY_STATUS:
                    raise OpenAIServerError(f"{self.cfg.base_url}: request rejected, {err}")
                ra = r.headers.get("retry-after")
                if ra and ra.replace(".", "", 1).isdigit():
                    delay = max(delay, float(ra))
            if attempt == self.cfg.max_retries:
                raise OpenAIServerError(f"{self.cfg.base_url}: gave up after {attempt + 1} attempts, last error {err}")
            self.retries += 1
            wait = delay * (0.5 + random.random())  # jitter spreads retries of concurrent requests
            log.warning("openai %s: attempt %d/%d failed (%s); retrying in %.1fs", self.cfg.base_url, attempt + 1,
                        self.cfg.max_retries + 1, err, wait)
            time.sleep(wait)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    def _parse(self, resp: dict, params: SamplingParams) -> list[Completion]:
        out = []
        for ch in sorted(resp["choices"], key=lambda c: c.get("index", 0)):
            lps = None
            if params.logprobs and ch.get("logprobs") and ch["logprobs"].get("content") is not None:
                lps = [t["logprob"] for t in ch["logprobs"]["content"]]
            finish = "length" if ch.get("finish_reason") == "length" else "stop"
            text, ids = ch["message"].get("content") or "", list(ch.get("token_ids") or [])
            if ids and isinstance(ch.get("stop_reason"), str):  # a stop string: vLLM cut the text, not the ids
                ids, text = self._cut_at_stop(ids, text, ch["stop_reason"])
                lps = lps[: len(ids)] if lps is not None else None
            out.append(Completion(text=text, token_ids=ids, finish_reason=finish, logprobs=lps))
        return out

    def _cut_at_stop(self, ids: list[int], text: str, stop: str) -> tuple[list[int], str]:
        """The ids (and their text) before ``stop``; no ids when the tokenizer cannot be loaded."""
        if self._tokenizer is None:
            try:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
            except Exception:  # noqa: BLE001 - a served name that is no local folder or cached hub id
                self._tokenizer = False
        if self._tokenizer is False:
            return [], text
        ids, text, _ = trim_at_stop(ids, text + stop, [stop],
                                    lambda x: self._tokenizer.decode(x, skip_special_tokens=True))
        return ids, text

    def generate(self, prompts: list[Messages], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """One request per prompt (``n`` completions each), ``max_concurrency`` at a time, in prompt order."""
        bodies = [self._body(p, params, s) for p, s in zip(prompts, prompt_seeds(prompts, params, seeds))]
        with ThreadPoolExecutor(max_workers=self.cfg.max_concurrency) as pool:
            resps = list(pool.map(self._post, bodies))
        return [self._parse(r, params) for r in resps]

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self.client.close()
