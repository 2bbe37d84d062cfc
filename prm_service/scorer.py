"""The PRM and how it scores: Q(s, a) for (prompt, response) pairs.

The PRM is the policy's backbone with a scalar head, a Hugging Face sequence classifier
with one label (`AutoModelForSequenceClassification`, loadable by other tools as is). It
reads exactly what the policy saw and wrote: the rendered prompt, then the response, each
encoded alone (`agent.encode_turn`), and Q(s, a) is the head's output on the last token
(the prompt's own last token for an empty response). That is the token the classifier's
own forward pools (its last non-pad token) whenever a row does not end in the pad token,
which the learner makes sure of.

Best-of-N and DPO score several responses to one prompt. With `share_prompt`, the prompt
is encoded once: one forward pass over the distinct prompts of a batch fills a KV cache,
and one pass over all responses reads (a copy of) their prompt's rows of it. Without it,
every pair is one full sequence. Both give the same scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from agent import encode_turn
from policy_server.hf_engine import pick_device, pick_dtype


@dataclass(frozen=True)
class ScoreRequest:
    prompt: str
    responses: list[str]


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


def pad_right(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


class PRMScorer:
    """A PRM on one device. `forward_passes` counts the model calls (for tests and benches)."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "float32",
                 trust_remote_code: bool = False, share_prompt: bool = True):
        self.device = pick_device(device)
        self.model, self.tokenizer = load_prm(model_path, pick_dtype(dtype, self.device), trust_remote_code)
        self.model.to(self.device).eval()
        self.pad_id = self.model.config.pad_token_id
        self.share_prompt, self.trust_remote_code = share_prompt, trust_remote_code
        self.forward_passes = 0
        self.prompt_rows = 0  # prompt encodings computed (each distinct prompt of a batch once, when shared)

    def load(self, model_path: str) -> None:
        """Replace the weights with those of a newer PRM checkpoint of the same architecture."""
        model, _ = load_prm(model_path, self.model.dtype, self.trust_remote_code)
        self.model.load_state_dict(model.state_dict())

    @torch.inference_mode()
    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Q of every response of every request, in request order."""
        pairs = [(i, encode_turn(self.tokenizer, r.prompt, resp)) for i, r in enumerate(requests)
                 for resp in r.responses]
        if not pairs:
            return [[] for _ in requests]
        if self.share_prompt:
            flat = self._score_shared(requests, pairs)
        else:
            ids, mask = pad_right([p + resp for _, (p, resp) in pairs], self.pad_id, self.device)
            flat = last_token_scores(self.model, ids, mask)
            self.forward_passes += 1
            self.prompt_rows += len(pairs)
        flat = flat.tolist()
        out, start = [], 0
        for r in requests:
            out.append(flat[start:start + len(r.responses)])
            start += len(r.responses)
        return out

    def _score_shared(self, requests: list[ScoreRequest], pairs) -> torch.Tensor:
        """One pass over the distinct prompts (KV cache), one over all responses."""
        prompt_row: dict[str, int] = {}
        prompt_ids: list[list[int]] = []
        for i, (p, _) in pairs:
            if requests[i].prompt not in prompt_row:
                prompt_row[requests[i].prompt] = len(prompt_ids)
                prompt_ids.append(p)
        ids, mask = pad_right(prompt_ids, self.pad_id, self.device)
        out = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=True)
        rows = torch.tensor([prompt_row[requests[i].prompt] for i, _ in pairs], device=self.device)
        prompt_len = mask.sum(dim=1)[rows]
        prompt_last = out.last_hidden_state[rows, prompt_len - 1]
        cache = out.past_key_values
        cache.batch_select_indices(rows)  # each response reads its own prompt's rows
        # An empty response reads as one pad token, masked out; it is scored on its prompt's end.
        responses = [resp for _, (_, resp) in pairs]
        resp_ids, resp_mask = pad_right([resp or [self.pad_id] for resp in responses], self.pad_id, self.device)
        resp_mask[:, 0] = torch.tensor([len(resp) > 0 for resp in responses], device=self.device)
        positions = prompt_len[:, None] + torch.arange(resp_ids.shape[1], device=self.device)
        hidden = self.model.base_model(input_ids=resp_ids, attention_mask=torch.cat([mask[rows], resp_mask], dim=1),
                                       position_ids=positions, past_key_values=cache).last_hidden_state
        self.forward_passes += 2
        self.prompt_rows += len(prompt_ids)
        lengths = resp_mask.sum(dim=1)
        last = hidden[torch.arange(len(rows), device=self.device), (lengths - 1).clamp(min=0)]
        last = torch.where((lengths > 0)[:, None], last, prompt_last)
        return head_scores(self.model, last)
