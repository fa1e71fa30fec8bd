"""New weights into a separately launched vLLM server during online training, and the probe that proves them.

Input: an ``OpenAISampler`` pointed at ``vllm serve`` (``base_url: http://HOST:PORT/v1``) that runs with
``VLLM_SERVER_DEV_MODE=1`` (vLLM then serves ``POST /collective_rpc`` and ``POST /reset_prefix_cache``),
and a folder that both this job and the server can read (the same machine, or a shared file system).
Output: ``ServerSampler``, the same sampler plus what ``posttrain.core.weight_sync`` needs:

* ``update_weights(chunk)`` writes one chunk (whole decoder layers, HF state-dict names) as a safetensors
  shard into a fresh round folder, so no full second copy of the model is ever built in memory;
* ``finish_weights()`` asks every worker of the server to load that folder in place (vLLM's own
  ``reload_weights`` through its collective RPC), resets the server's prefix cache (cached KV blocks of the
  old weights must not be reused), and deletes the rounds before it;
* ``probe_logprobs(ids)`` asks ``/v1/completions`` for the prompt log-probs of a token sequence, so the
  probe check that guards in-process engines guards the server too.

Transport: files, which works on CPUs and GPUs alike and costs one write and one read of the weights per
episode (for a 7B bf16 policy about 15 GB; on a local NVMe a few seconds, on a network file system more).
vLLM's NCCL weight-transfer engine (``/init_weight_transfer_engine``, GPU to GPU, no disk) would avoid
that cost on GPUs; it is not used here because it could not be run and tested on the machines this
project is developed on (CPU only).

Only the writer rank (rank 0) writes and asks for the reload; with several ranks the others iterate the
chunks too (ZeRO-3 gathers each chunk on every rank) and write nothing.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import httpx

from posttrain.core.errors import BadInput
from posttrain.core.sampling.base import weights_blob

log = logging.getLogger("posttrain")

DEV_MODE_HINT = ("start the server with VLLM_SERVER_DEV_MODE=1 in its environment (vLLM then serves "
                 "/collective_rpc), or set sync_weights: false to sample from the fixed starting model")


class ServerSampler:
    """An OpenAI-compatible vLLM server that takes new weights (see the module docstring)."""

    def __init__(self, inner: Any, weights_dir: str | Path, writer: bool = True, timeout_s: float = 600.0):
        self.inner = inner
        self.name = inner.name
        self.dir = Path(weights_dir)
        self.writer = writer
        base = inner.cfg.base_url.rstrip("/")
        self.root = base[: -len("/v1")] if base.endswith("/v1") else base
        self.http = httpx.Client(base_url=self.root, timeout=timeout_s)
        self.round = 0
        self.shards = 0

    # -- sampling: the inner sampler's
    def generate(self, *a: Any, **k: Any) -> Any:
        """``OpenAISampler.generate``."""
        return self.inner.generate(*a, **k)

    def encode(self, prompts: Any) -> Any:
        """``OpenAISampler.encode`` (when it has one)."""
        return self.inner.encode(prompts)

    def close(self) -> None:
        """Close both HTTP clients (the server keeps running and keeps the last weights)."""
        self.http.close()
        if hasattr(self.inner, "close"):
            self.inner.close()

    # -- weights
    def check_receiver(self) -> None:
        """Refuse, in one line, a server that cannot receive weights (no ``/collective_rpc``) or does not answer."""
        try:
            r = self.http.post("/collective_rpc", json={})  # no method: a dev-mode server answers 400
        except httpx.HTTPError as e:
            raise BadInput(f"{self.root}: the vLLM server does not answer ({type(e).__name__}: {e})") from None
        if r.status_code in (404, 405):
            raise BadInput(f"{self.root}: this server cannot receive new weights (no /collective_rpc): "
                           f"{DEV_MODE_HINT}")

    def update_weights(self, named_tensors: list[tuple[str, Any]]) -> None:
        """Write one chunk as a shard of the current round (the writer rank only)."""
        if not self.writer:
            return
        from safetensors.torch import save_file

        if self.shards == 0:
            self.round += 1
            shutil.rmtree(self._round_dir(), ignore_errors=True)  # a folder left by an earlier run
            self._round_dir().mkdir(parents=True)
        self.shards += 1
        tmp = self._round_dir() / f".shard-{self.shards:05d}.tmp"
        save_file(weights_blob(named_tensors), str(tmp))
        tmp.rename(self._round_dir() / f"model-{self.shards:05d}.safetensors")  # never a half-written shard

    def finish_weights(self) -> None:
        """Have the server load this round's shards in place; then drop the rounds before it."""
        if not self.writer or self.shards == 0:
            return
        where = self._round_dir()
        t0 = time.time()
        self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(where)}},
                   "reload the weights")
        self._post("/reset_prefix_cache", None, "reset its prefix cache")
        log.info("vLLM server %s: loaded %d shard(s) from %s in %.1fs", self.root, self.shards, where,
                 time.time() - t0)
        self.shards = 0
        for old in self.dir.glob("round-*"):
            if old != where:  # the server may still read from the folder it last loaded
                shutil.rmtree(old, ignore_errors=True)

    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        """Log-probability the server gives each ``token_ids[i]`` (i >= 1) given the tokens before it."""
        body = {"model": self.inner.model, "prompt": list(token_ids), "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": 0}
        out = self._post("/v1/completions", body, "score the probe")
        lps = out["choices"][0].get("prompt_logprobs")
        if not lps or len(lps) != len(token_ids):
            raise BadInput(f"{self.root}: the server returned no prompt log-probs for the probe (is it vLLM?)")
        return [float(lps[i][str(t)]["logprob"]) for i, t in enumerate(token_ids) if i > 0]

    def _round_dir(self) -> Path:
        return self.dir / f"round-{self.round:06d}"

    def _post(self, path: str, body: dict | None, what: str) -> dict:
        try:
            r = self.http.post(path, json=body) if body is not None else self.http.post(path)
        except httpx.HTTPError as e:
            raise BadInput(f"{self.root}: could not {what} ({type(e).__name__}: {e})") from None
        if r.status_code in (404, 405):
            raise BadInput(f"{self.root}: could not {what}: HTTP {r.status_code} on {path}; {DEV_MODE_HINT}")
        if r.status_code != 200:
            raise BadInput(f"{self.root}: could not {what}: HTTP {r.status_code}: {' '.join(r.text[:300].split())}")
        return r.json() if r.content else {}
