"""How the PRM service scores: Q(s, a) for a state's token ids and each response's (the PRM
itself, its loading and its head: models/prm.py).

Scoring with `share_prompt` (the default): the state is encoded once for all its
responses, which hang off it as branches of one row (`agent.tree`); the state's KV cache
is kept between requests (`cached_states` of them, least recently used dropped), so the
next step of an episode, whose prompt extends this one, computes only its new tokens.
Without it, every (state, response) is one full sequence: the reference, and the old cost.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from agent.tree import tree_row
from models.prm import head_scores, last_token_scores, load_prm, pad_right
from serving.devices import pick_device, pick_dtype


@dataclass(frozen=True)
class ScoreRequest:
    prompt_ids: list[int]  # the state: the whole prompt the policy was fed
    responses: list[list[int]]  # each action: the response's ids as the policy generated them


@dataclass
class CachedState:
    ids: list[int]
    cache: DynamicCache = field(repr=False)


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
