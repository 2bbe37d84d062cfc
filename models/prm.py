"""The PRM as a model: Q(s, a) from the policy's backbone and a scalar head.

The PRM is the policy's backbone with a scalar head, a Hugging Face sequence classifier
with one label (`AutoModelForSequenceClassification`, loadable by other tools as is). It
reads exactly the ids the policy saw and wrote: the state is the whole prompt the policy
was fed (for prompt.state=episode, the episode so far as one conversation), the action the
response ids as generated, and Q(s, a) is the head's output on the response's last token
(the prompt's last token for an empty response). In an episode's token sequence that is
the end of each assistant turn, so one pass over an episode gives Q at every turn
(`turn_scores`): the learners train on that, and the PRM service (prm_service/) scores with it.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer


def load_prm(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
             new_head: bool = False):
    """(model, tokenizer) of a PRM folder; `new_head` starts one from a policy (causal LM)
    folder, with a freshly initialised scalar head."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    is_prm = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    if not new_head and not (is_prm and config.num_labels == 1):
        raise ValueError(f"{path} is not a PRM checkpoint (a sequence classifier with one label); "
                         "train one with mode=critic")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, pad_token_id=pad_id, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, tokenizer


def head_scores(model, hidden: torch.Tensor) -> torch.Tensor:
    """The scalar head on hidden states, in float32 whatever the model's dtype: in bfloat16,
    Q near 1 would move in steps of 1/128, and Best-of-N and DPO would meet false ties."""
    head = model.score
    bias = None if head.bias is None else head.bias.float()
    return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias).squeeze(-1)


def last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Q of right-padded (prompt + response) rows: the head on each row's last real token."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = attention_mask.sum(dim=1) - 1
    return head_scores(model, hidden[torch.arange(len(last), device=hidden.device), last])


def turn_scores(model, sequence: list[int], turn_ends: list[int], device) -> torch.Tensor:
    """Q at each of `turn_ends` (indices of the last token of each response) of one causal
    token sequence: an episode's Q(s_t, a_t) at every turn from one forward pass."""
    hidden = model.base_model(input_ids=torch.tensor([sequence], device=device)).last_hidden_state
    return head_scores(model, hidden[0, torch.tensor(turn_ends, device=device)])


def pad_right(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)
