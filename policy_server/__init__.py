"""Policy server: Ray actors that generate actions for rollout workers and take new weights.

    servers = start_policy_servers(cfg.policy, resolve_model(cfg.policy.model), seed)
    result = await servers[0].generate.remote(prompts, SamplingParams(temperature=0.7))
"""
from policy_server.engine import Generation, InferenceEngine, SamplingParams
from policy_server.models import EMBEDDED, ModelError, resolve_model
from policy_server.server import GenerateResult, PolicyServer, start_policy_servers

__all__ = ["Generation", "GenerateResult", "InferenceEngine", "SamplingParams", "PolicyServer",
           "start_policy_servers", "resolve_model", "ModelError", "EMBEDDED"]
