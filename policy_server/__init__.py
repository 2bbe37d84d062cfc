"""Policy server: Ray actors that generate actions for rollout workers and take new weights.

    policy = start_policy_servers(cfg.policy, resolve_model(cfg.policy.model), seed)  # a PolicyClient
    result = await policy.generate(prompts, SamplingParams(temperature=0.7), session=episode_id)
    policy.load_weights(model.state_dict(), version=1)

Engines: `hf` (transformers, `hf_engine.py`) and `vllm` (`vllm_engine.py`, imported only
when configured).
"""
from policy_server.engine import Generation, InferenceEngine, SamplingParams
from policy_server.models import EMBEDDED, ModelError, resolve_model
from policy_server.server import GenerateResult, PolicyClient, PolicyServer, start_policy_servers

__all__ = ["Generation", "GenerateResult", "InferenceEngine", "SamplingParams", "PolicyClient", "PolicyServer",
           "start_policy_servers", "resolve_model", "ModelError", "EMBEDDED"]
