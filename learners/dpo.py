"""AgentPRM stage 3: online DPO of the policy against the PRM.

For a state s from the stage-1 rollouts, the current policy samples two responses; the PRM
scores both; the higher is chosen, the lower rejected (ties skipped); the DPO loss compares
the policy's log-likelihood ratio of the two with that of a frozen reference (the
iteration's starting policy):

    loss = -log sigmoid(beta * ((log pi(c|s) - log pi(r|s)) - (log ref(c|s) - log ref(r|s))))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from learners.data import IGNORE


def response_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probabilities of each row's response tokens (labels != IGNORE); the
    logits at position t predict the token at t + 1."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(2, labels.clamp(min=0)[..., None])[..., 0]
    return (token_logprobs * mask).sum(dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean DPO loss over pairs of sequence log-probabilities, and what to log about it:
    the implicit reward margin beta * (policy - reference ratio) and how often it is > 0."""
    margin = beta * ((policy_chosen - policy_rejected) - (ref_chosen - ref_rejected))
    loss = -F.logsigmoid(margin).mean()
    return loss, {"loss": loss.item(), "reward_margin": margin.mean().item(),
                  "reward_accuracy": (margin > 0).float().mean().item()}
