"""transformers inference engine: batched sampling with a KV cache, on CPU or CUDA.

A small decode loop instead of `model.generate`, for what the policy server needs and
`generate` does not give together: per-request sampling parameters and seeds inside one
batch, token log-probabilities, stop strings, and n samples that share one prefill.
`BatchingHFEngine` is its async face: concurrent requests are merged into one decode batch.
"""
from __future__ import annotations

import itertools

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from policy_server.engine import Generation, Prompt, SamplingParams, per_prompt, prompt_ids
from serving.batching import DynamicBatcher
from serving.devices import pick_device, pick_dtype

class HFEngine:
    def __init__(self, model_path: str, device: str = "auto", dtype: str = "float32",
                 trust_remote_code: bool = False, seed: int = 0):
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=pick_dtype(dtype, self.device), trust_remote_code=trust_remote_code
        ).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in eos + [self.tokenizer.eos_token_id] if i is not None}
        self._default_rng = torch.Generator(device=self.device).manual_seed(seed)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=True)
        self.model.eval()

    @torch.inference_mode()
    def generate(self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams]) -> list[list[Generation]]:
        """Sample each prompt's `n` continuations; one prefill per prompt, one batch for all."""
        params = per_prompt(params, len(prompts))
        if not prompts:
            return []
        # Rows: prompt i repeated n_i times. Each seeded prompt owns a generator; its samples
        # draw from it in row order, so results do not depend on what else is in the batch.
        row_prompt = [i for i, p in enumerate(params) for _ in range(p.n)]
        rngs = [torch.Generator(device=self.device).manual_seed(p.seed) if p.seed is not None
                else self._default_rng for p in params]
        row_params = [params[i] for i in row_prompt]
        temperature = torch.tensor([p.temperature for p in row_params], device=self.device)
        top_p = torch.tensor([p.top_p for p in row_params], device=self.device)

        input_ids, mask = self._left_padded([prompt_ids(self.tokenizer, p) for p in prompts])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)  # the LM head on the last position only
        cache = out.past_key_values
        expand = torch.tensor(row_prompt, device=self.device)
        cache.batch_select_indices(expand)
        logits = out.logits[:, -1, :].float()[expand]
        mask, next_pos = mask[expand], positions[expand, -1] + 1

        rows = list(range(len(row_prompt)))  # original row index of each live batch row
        tokens: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        results: list[Generation | None] = [None] * len(rows)
        while rows:
            live = torch.tensor(rows, device=self.device)
            chosen = self._sample(logits, temperature[live], top_p[live], [rngs[row_prompt[r]] for r in rows])
            chosen_logprobs = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None])[:, 0]
            keep = []
            for b, r in enumerate(rows):
                token = int(chosen[b])
                tokens[r].append(token)
                logprobs[r].append(float(chosen_logprobs[b]))
                done = self._finished(tokens[r], row_params[r])
                if done:
                    results[r] = Generation(done[0], tokens[r], logprobs[r], done[1])
                else:
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(rows):  # drop finished rows from the batch and the cache
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                chosen, mask, next_pos = chosen[idx], mask[idx], next_pos[idx]
                rows = [rows[b] for b in keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = self.model(input_ids=chosen[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                             past_key_values=cache, use_cache=True)
            cache, logits, next_pos = out.past_key_values, out.logits[:, -1, :].float(), next_pos + 1

        grouped: list[list[Generation]] = [[] for _ in prompts]
        for r, i in enumerate(row_prompt):
            grouped[i].append(results[r])
        return grouped

    def _left_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        return ids.to(self.device), mask.to(self.device)

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                rngs: list[torch.Generator]) -> torch.Tensor:
        greedy = logits.argmax(dim=-1)
        if bool((temperature == 0).all()):
            return greedy
        probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]  # nucleus: keep the top mass
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        picks = torch.stack([torch.multinomial(sorted_probs[b], 1, generator=rngs[b])[0]
                             for b in range(len(rngs))])
        sampled = order.gather(1, picks[:, None])[:, 0]
        return torch.where(temperature == 0, greedy, sampled)

    def _finished(self, tokens: list[int], params: SamplingParams) -> tuple[str, str] | None:
        """(text, finish reason) once a row is done, else None."""
        if tokens[-1] in self.eos_ids:
            return self.tokenizer.decode(tokens[:-1], skip_special_tokens=True), "stop"
        if params.stop or len(tokens) >= params.max_tokens:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            hits = [text.index(s) for s in params.stop if s in text]
            if hits:
                return text[: min(hits)], "stop"
            if len(tokens) >= params.max_tokens:
                return text, "length"
        return None


class BatchingHFEngine:
    """`HFEngine` behind a `DynamicBatcher`: whatever is queued when the engine frees up (up to
    `max_batch_size` rows, waiting at most `batch_wait_ms` for more) runs as one batch, so
    episodes of all rollout workers share the forward passes. Batches and weight loads run
    one at a time on the engine's thread."""

    name = "hf"

    def __init__(self, engine: HFEngine, max_batch_size: int = 32, batch_wait_ms: float = 5.0):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._batcher = DynamicBatcher(self._run_batch, max_batch_size, batch_wait_ms / 1000,
                                       size=lambda request: sum(p.n for p in request[1]))
        self._stats = {"requests": 0, "prompts": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0}  # no prefix cache

    async def generate(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[list[Generation]]:
        self._stats["requests"] += 1
        return await self._batcher.submit((prompts, params))

    async def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        await self._batcher.run_exclusive(self.engine.load_weights, state_dict)

    def stats(self) -> dict[str, int]:
        return {**self._stats, "batches": self._batcher.batches}

    def shutdown(self) -> None:
        self._batcher.shutdown()

    def _run_batch(self, requests: list[tuple[list[Prompt], list[SamplingParams]]]) -> list[list[list[Generation]]]:
        prompts = [prompt_ids(self.tokenizer, p) for r in requests for p in r[0]]
        outputs = self.engine.generate(prompts, [p for r in requests for p in r[1]])
        self._stats["prompts"] += len(prompts)
        self._stats["prompt_tokens"] += sum(len(p) for p in prompts)
        starts = itertools.accumulate([len(r[0]) for r in requests], initial=0)
        return [outputs[start:start + len(r[0])] for start, r in zip(starts, requests)]
