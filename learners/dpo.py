"""Stage 3 of AgentPRM and InversePRM: online DPO of the policy against the PRM.

For a state s from the stage-1 data set (a whole-episode prompt, in the ids the policy was
fed), the current policy samples `dpo.samples_per_state` responses; the PRM scores them; of
their distinct commands the highest is chosen, the lowest rejected (no pair when all send one
command or the two tie); the DPO loss compares the policy's log-likelihood ratio
of the two with that of a frozen reference (the iteration's starting policy):

    loss = -log sigmoid(beta * ((log pi(c|s) - log pi(r|s)) - (log ref(c|s) - log ref(r|s))))

DPO reads whole episodes, as the PRM does. Its unit is a context: the distinct states of
one stage-1 episode (`context_states`), each a prefix of the next. Every state of a context
gets its samples and, unless they tie, a pair; the pairs' responses are learnt as generated
(their ids; an end-of-turn token only where the policy wrote one), as branches off one
encoding of the context's longest state, each hanging where its own state ends
(`agent.tree`): the history is encoded once per episode, not once per pair, with the
gradient of every branch through it. `dpo.batch_size` counts contexts; a context's row holds
the leading pairs that fit in `dpo.max_seq_len`.

Steered exploration (`dpo.exploration_prompt`) samples the two responses under a prompt
with an exploration hint; the PRM and the loss still read the plain prompt s.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import ray
import torch
import torch.distributed as dist
import torch.nn.functional as F

from agent import command_to_send, steer_prompt
from agent.tree import tree_row
from learners.data import branch_logprobs
from learners.qtargets import context_states, state_key
from learners.trainer import (build_engine, count_steps, export_hf, init_worker, run_recipe, train_steps,
                              worker_share)
from policy_server import SamplingParams


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean DPO loss over pairs of sequence log-probabilities, and what to log about it:
    the implicit reward margin beta * (policy - reference ratio) and how often it is > 0."""
    margin = beta * ((policy_chosen - policy_rejected) - (ref_chosen - ref_rejected))
    loss = -F.logsigmoid(margin).mean()
    return loss, {"loss": loss.item(), "reward_margin": margin.mean().item(),
                  "reward_accuracy": (margin > 0).float().mean().item()}


def kept_pair_weight(kept: int, step_pairs: float, micro_batches: int) -> float:
    """The factor on the mean loss of a micro-batch's `kept` pairs that makes the engines'
    average over the step's `micro_batches` micro-batches (all ranks) the mean over its
    `step_pairs` kept pairs, however many ties the step had and wherever they fell."""
    return kept * micro_batches / step_pairs


@dataclass
class PreferencePair:
    state: list[int]  # the prompt's ids
    chosen: list[int]  # response ids as generated
    rejected: list[int]
    chosen_score: float
    rejected_score: float
    policy_version: int  # the weights that sampled both responses


def prefer(state: list[int], texts: list[str], responses: list[list[int]], scores: list[float],
           policy_version: int) -> PreferencePair | None:
    """The PRM's best and worst of the samples (their texts, ids and scores), one sample per
    distinct command (the first); None on a tie: a single command, or equal scores. Samples
    of one command never pair: the PRM learnt one Q per command at a state, so a gap between
    two wordings of one command is noise, not a preference."""
    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        first.setdefault(command_to_send(text), i)
    distinct = list(first.values())
    best, worst = max(distinct, key=lambda i: scores[i]), min(distinct, key=lambda i: scores[i])
    if scores[best] == scores[worst]:
        return None
    return PreferencePair(state, responses[best], responses[worst], scores[best], scores[worst], policy_version)


@dataclass
class ContextPairs:
    """What DPO learns from one context: a pair per state that did not tie, in state order."""
    pairs: list[PreferencePair]
    states: int  # the context's states that were sampled, ties included


def context_logprobs(model, pairs: list[PreferencePair], device) -> torch.Tensor:
    """[pairs, 2]: log pi(chosen | state) and log pi(rejected | state) of each pair, whose states
    are prefixes of one context: its longest state is encoded once, and each response hangs
    off it where the response's state ends."""
    trunk = max((p.state for p in pairs), key=len)
    branches = []
    for p in pairs:
        if trunk[:len(p.state)] != p.state:
            raise ValueError("the pairs' states are not prefixes of one context")
        branches += [(len(p.state), p.chosen), (len(p.state), p.rejected)]
    return branch_logprobs(model, tree_row(trunk, branches).to(device), branches).view(len(pairs), 2)


def fitting_pairs(pairs: list[PreferencePair], max_seq_len: int) -> list[PreferencePair]:
    """The leading pairs (in state order) whose row fits in `max_seq_len` tokens: the longest
    of their states and both responses of each."""
    kept, responses = [], 0
    for pair in pairs:
        responses += len(pair.chosen) + len(pair.rejected)
        if len(pair.state) + responses > max_seq_len:
            break
        kept.append(pair)
    return kept


def train_dpo(cfg, states: Path, init_model: str, policy, prm, out_dir: Path) -> Path:
    """Online DPO from `init_model` (also the frozen reference) on the states of `states`
    (stage 1's qtargets.parquet or transitions.parquet, train split), sampling from `policy`
    (a PolicyClient serving `init_model`) and scoring with `prm` (a PRMClient). Every
    `dpo.push_every` steps, and after the last, the weights go to the policy server as its
    next version.
    Returns the Hugging Face folder of the new policy."""
    run_recipe(dpo_recipe, cfg, "dpo", out_dir, states=str(states.resolve()), init_model=init_model,
               policy=policy, prm=prm, first_version=max(policy.versions()))
    return out_dir / "policy"


class PairSampler:
    """One worker's preference pairs, step by step. The requests of step t go out at step
    t - max_policy_lag x push_every, so the policy server samples them with weights at most
    `max_policy_lag` pushes behind the learner's; each pair keeps the version that sampled it."""

    def __init__(self, policy, prm, contexts_of_step, dpo: dict, seed: int, total_steps: int, tokenizer):
        self.policy, self.prm, self.contexts_of_step, self.dpo = policy, prm, contexts_of_step, dpo
        self.tokenizer = tokenizer  # steered exploration edits the prompt's text
        self.seed, self.total_steps = seed, total_steps
        self.ahead = dpo["max_policy_lag"] * dpo["push_every"]
        self.in_flight: dict[int, list] = {}

    def pairs(self, step: int) -> list[ContextPairs]:
        for t in range(step, min(step + self.ahead, self.total_steps) + 1):
            if t not in self.in_flight:
                self.in_flight[t] = [[(state, self._sample(state, t)) for state in context]
                                     for context in self.contexts_of_step(t)]
        out = []
        for context in self.in_flight.pop(step):
            sampled = [(state, ray.get(ref)) for state, ref in context]
            # In state order, to the replica that holds the context: each request computes
            # only the tokens after the previous state (the PRM service's cached history).
            session = state_key(context[0][0])
            scored = ray.get([self.prm.score(state, [g.token_ids for g in result.generations[0]], session=session)
                              for state, result in sampled])
            pairs = [prefer(state, [g.text for g in result.generations[0]],
                            [g.token_ids for g in result.generations[0]], s.scores, result.policy_version)
                     for (state, result), s in zip(sampled, scored)]
            out.append(ContextPairs(fitting_pairs([p for p in pairs if p is not None], self.dpo["max_seq_len"]),
                                    len(pairs)))
        return out

    def _sample(self, state: list[int], step: int):
        """`dpo.samples_per_state` responses to `state`; with `dpo.exploration_prompt`, to the
        steered prompt (steered exploration: the pair is still scored and learnt under `state`)."""
        seed = zlib.crc32(f"{self.seed}:{step}:{state_key(state)}".encode())
        hint = self.dpo["exploration_prompt"]
        prompt = self.tokenizer.encode(steer_prompt(self.tokenizer.decode(state), hint),
                                       add_special_tokens=False) if hint else state
        return self.policy.generate([prompt], SamplingParams(n=self.dpo["samples_per_state"],
                                                            temperature=self.dpo["temperature"],
                                                            max_tokens=self.dpo["max_new_tokens"], seed=seed))


def dpo_recipe(config: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dpo, learner = config["train"], config["learner"]
    device = init_worker(config["seed"], learner)
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir, policy = Path(config["out_dir"]), config["policy"]
    tokenizer = AutoTokenizer.from_pretrained(config["init_model"], trust_remote_code=config["trust_remote_code"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # Contexts: the distinct states of the stage-1 train episodes, grouped by the context they
    # extend, in a fixed order; of each, the states that fit in a row with one pair.
    room = dpo["max_seq_len"] - 2 * dpo["max_new_tokens"]
    found = context_states(pq.read_table(config["states"]), "train")
    contexts = [c for c in ([s for s in c if len(s) <= room] for c in found) if c]
    states = sum(len(c) for c in contexts)
    if not contexts:
        raise ValueError(f"no train state in {config['states']} within dpo.max_seq_len - 2 x dpo.max_new_tokens")
    total_steps = count_steps(dpo, len(contexts))
    if rank == 0:
        print(f"dpo: {len(contexts)} contexts of {states} states ({sum(map(len, found)) - states} longer than "
              f"dpo.max_seq_len - 2 x dpo.max_new_tokens left out), {total_steps} steps of {dpo['batch_size']} "
              f"contexts on {world} workers, weights to the policy server every {dpo['push_every']} steps",
              flush=True)

    load = dict(dtype=torch.float32, trust_remote_code=config["trust_remote_code"])
    model = AutoModelForCausalLM.from_pretrained(config["init_model"], **load).to(device)
    # The reference computes in the engine's dtype: at step 1 its log-probabilities then equal
    # the policy's, and the DPO margin starts at 0, not at rounding noise.
    reference = AutoModelForCausalLM.from_pretrained(
        config["init_model"], **{**load, "dtype": getattr(torch, learner["dtype"])}).to(device).eval()
    reference.requires_grad_(False)
    engine, optimizer = build_engine(model, dpo, learner, total_steps)
    share = worker_share(contexts, dpo["batch_size"], config["seed"], length=lambda c: len(c[-1]))
    sampler = PairSampler(policy, config["prm"], share, dpo, config["seed"], total_steps, tokenizer)
    # A micro-batch of ties still runs forward and backward (every rank takes part in each
    # step), on this stand-in pair of three tokens with its loss multiplied by 0.
    stand_in = [PreferencePair([pad_id], [pad_id], [pad_id], 0.0, 0.0, 0)]
    served = {"version": config["first_version"], "started": False}  # the latest weights on the policy server
    this_step = {"pairs": 0.0, "micro_batches": 0}  # pairs kept on all ranks, micro-batches of all ranks

    def push(step: int) -> None:
        """The weights after `step` steps become version first + ceil(step / push_every)."""
        weights = engine.export_state_dict()  # all ranks take part; the full weights land on rank 0
        served["version"] = config["first_version"] + math.ceil(step / dpo["push_every"])
        if rank == 0:
            policy.load_weights(weights, served["version"])
        # No rank asks for samples before the new version is in: without this, rank 1 sent
        # its requests while rank 0 was still loading, and they ran on weights 2 pushes old.
        dist.barrier()

    def restarted(step: int) -> bool:
        """Whether this job follows a lost one: resumed from a checkpoint, or back at the start
        after the lost one pushed weights (the service keeps another version than the first).
        Rank 0 asks the service and tells the others: push is collective."""
        answer = [step > 1 or (rank == 0 and policy.latest_version() != config["first_version"])]
        dist.broadcast_object_list(answer, src=0)
        return answer[0]

    def batch_for_step(step: int) -> list[ContextPairs]:
        # A restarted job serves its own weights first (a checkpoint's, or the initial ones as
        # the first version), so no pair is sampled by weights the learner no longer has.
        if not served["started"] and restarted(step):
            push(step - 1)
        served["started"] = True
        batch = sampler.pairs(step)
        kept = torch.tensor([float(sum(len(c.pairs) for c in batch))], dtype=torch.float64, device=device)
        dist.all_reduce(kept)
        this_step.update(pairs=kept.item(), micro_batches=world * math.ceil(len(batch) / dpo["micro_batch_size"]))
        return batch

    def micro_loss(micro: list[ContextPairs]) -> tuple[torch.Tensor, dict[str, float]]:
        groups = [c.pairs for c in micro if c.pairs]
        logprobs = torch.cat([context_logprobs(engine, g, device) for g in groups or [stand_in]])
        with torch.no_grad():
            ref = torch.cat([context_logprobs(reference, g, device) for g in groups or [stand_in]])
        loss, stats = dpo_loss(logprobs[:, 0], logprobs[:, 1], ref[:, 0], ref[:, 1], dpo["beta"])
        if not groups:  # the same keys in the same order on every rank: they are all-reduced
            return loss * 0.0, {**{k: 0.0 for k in stats}, "policy_lag": 0.0, "tie_rate": 1.0, "tokens": 0.0}
        kept = [p for g in groups for p in g]
        weight = kept_pair_weight(len(kept), this_step["pairs"], this_step["micro_batches"])
        lag = [served["version"] - p.policy_version for p in kept]  # versions behind the latest push
        stats["policy_lag"] = sum(lag) / len(lag)
        logged = {k: v * weight for k, v in stats.items()}  # averaged by train_steps: means over kept pairs
        tokens = sum(max(len(p.state) for p in g) + sum(len(p.chosen) + len(p.rejected) for p in g) for g in groups)
        return loss * weight, {**logged, "tie_rate": 1 - len(kept) / sum(c.states for c in micro),
                               "tokens": float(tokens)}

    def after_step(step: int) -> None:
        if step % dpo["push_every"] == 0 or step == total_steps:
            push(step)

    train_steps(engine, optimizer, batch_for_step, micro_loss, dpo, learner, total_steps, out_dir, "dpo", after_step)
    weights = engine.export_state_dict()
    if rank == 0:
        export_hf(engine.module, weights, tokenizer, out_dir / "policy")
