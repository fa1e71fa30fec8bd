"""Samplers: one protocol (``Sampler``) and three backends (hf, vllm, openai)."""

from posttrain.core.sampling.base import Completion, Sampler, SamplerConfig, SamplingParams, make_sampler

__all__ = ["Completion", "Sampler", "SamplerConfig", "SamplingParams", "make_sampler"]
