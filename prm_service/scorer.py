"""The PRM and how it scores: Q(s, a) for a state's token ids and a response's.

The PRM is the policy's backbone with a scalar head, a Hugging Face sequence classifier
with one label (`AutoModelForSequenceClassification`, loadable by other tools as is). It
reads exactly the ids the policy saw and wrote: the state is the whole prompt the policy
was fed (for prompt.state=episode, the episode so far as one conversation), the action the
response ids as generated, and Q(s, a) is the head's output on the response's last token
(the prompt's last token for an empty response). In an episode's token sequence that is
the end of each assistant turn, so one pass over an episode gives Q at every turn
(`turn_scores`), and the learner trains on that.

Scoring with `share_prompt` (the default): the state is encoded once for all its
responses, which hang off it as branches of one row (`agent.tree`); the state's KV cache
is kept between requests (`cached_states` of them, least recently used dropped), so the
next step of an episode, whose prompt extends this one, computes only its new tokens.
Without it, every (state, response) is one full sequence: the reference, and the old cost.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DynamicCache

from agent.tree import tree_row
from policy_server.hf_engine import pick_device, pick_dtype


@dataclass(frozen=True)
class ScoreRequest:
    prompt_ids: list[int]  # the state: the whole prompt the policy was fed
    responses: list[list[int]]  # each action: the response's ids as the policy generated them


@dataclass
class CachedState:
    ids: list[int]
    cache: DynamicCache = field(repr=False)


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


class PRMScorer:
    """A PRM on one device. `forward_passes` and `computed_tokens` count the model's work
    (for tests and benches)."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "float32",
                 trust_remote_code: bool = False, share_prompt: bool = True, cached_states: int = 16):
        self.device = pick_device(device)
        self.model, self.tokenizer = load_prm(model_path, pick_dtype(dtype, self.device), trust_remote_code)
        self.model.to(self.device).eval()
        self.pad_id = self.model.config.pad_token_id
        self.share_prompt, self.trust_remote_code = share_prompt, trust_remote_code
        self.cached_states = cached_states
        self._states: list[CachedState] = []  # most recently used last
        self.forward_passes = 0
        self.computed_tokens = 0  # tokens the model computed (cached history excluded)

    def load(self, model_path: str) -> None:
        """Replace the weights with those of a newer PRM checkpoint of the same architecture."""
        model, _ = load_prm(model_path, self.model.dtype, self.trust_remote_code)
        self.model.load_state_dict(model.state_dict())
        self._states.clear()  # the cached states were computed by the old weights

    @torch.inference_mode()
    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Q of every response of every request, in request order."""
        for r in requests:
            if not r.prompt_ids:
                raise ValueError("a PRM request needs the state's prompt ids (got none)")
        if self.share_prompt:
            return [self._score_branches(r) if r.responses else [] for r in requests]
        rows = [r.prompt_ids + resp for r in requests for resp in r.responses]
        if not rows:
            return [[] for _ in requests]
        ids, mask = pad_right(rows, self.pad_id, self.device)
        flat = last_token_scores(self.model, ids, mask).tolist()
        self.forward_passes += 1
        self.computed_tokens += int(mask.sum())
        out, start = [], 0
        for r in requests:
            out.append(flat[start:start + len(r.responses)])
            start += len(r.responses)
        return out

    def _score_branches(self, request: ScoreRequest) -> list[float]:
        """The state's new tokens (after its longest cached prefix) and every response, in one
        pass of one row; the cache then holds the state, ready for the episode's next step."""
        state = self._cached_prefix(request.prompt_ids)
        past = len(state.ids)
        trunk = request.prompt_ids[past:]
        row = tree_row(trunk, [(len(trunk), r) for r in request.responses], past=past).to(self.device)
        hidden = self.model.base_model(**row.model_inputs(), past_key_values=state.cache,
                                       use_cache=True).last_hidden_state
        state.cache.crop(len(request.prompt_ids))  # drop the responses, keep the state
        state.ids = list(request.prompt_ids)
        self.forward_passes += 1
        self.computed_tokens += row.input_ids.shape[1]
        return head_scores(self.model, hidden[0, row.branch_ends]).tolist()

    def _cached_prefix(self, prompt_ids: list[int]) -> CachedState:
        """The cached state that is the longest prefix of `prompt_ids`, else a new empty one;
        it moves to the most recently used place. The prompt's last token is always computed
        anew (an empty response is scored on it): a cached state of the whole prompt gives
        up its last token."""
        best = None
        for state in self._states:
            if len(state.ids) <= len(prompt_ids) and prompt_ids[:len(state.ids)] == state.ids and (
                    best is None or len(state.ids) > len(best.ids)):
                best = state
        if best is None:
            best = CachedState([], DynamicCache(config=self.model.config))
            if len(self._states) >= self.cached_states:
                self._states.pop(0)
        else:
            self._states.remove(best)
            if len(best.ids) == len(prompt_ids):
                best.cache.crop(len(prompt_ids) - 1)
                best.ids = best.ids[:-1]
        self._states.append(best)
        return best
