"""Online DPO: the loss and its gradient on a hand-checked case, log-probabilities of responses."""
import json
import math

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learners.dpo import PreferencePair, context_logprobs, dpo_loss, fitting_pairs, kept_pair_weight, prefer


def test_dpo_loss_and_gradient_by_hand():
    # beta (1 - 0) = 0.5: loss = log(1 + e^-0.5); d loss / d log pi(c) = -beta sigmoid(-0.5)
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    loss, stats = dpo_loss(pc, pr, torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.5)))
    loss.backward()
    expected = 0.5 / (1 + math.exp(0.5))
    assert pc.grad.item() == pytest.approx(-expected) and pr.grad.item() == pytest.approx(expected)
    assert stats["reward_margin"] == pytest.approx(0.5) and stats["reward_accuracy"] == 1.0
    # The reference's own preference is subtracted: the same ratio as the reference gives log 2.
    same, _ = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([-4.0]), 0.1)
    assert same.item() == pytest.approx(math.log(2))


def test_dpo_with_a_shared_state_equals_two_full_sequences(tiny_model):
    """Chosen and rejected off one encoding of their state: the same sequence log-probabilities,
    DPO loss and gradient as each response after its own copy of the state."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model)
    state = tokenizer.encode("<|im_start|>user\nYour task is to: look.<|im_end|>\n<|im_start|>assistant\n")
    pair = PreferencePair(state, tokenizer.encode("ACTION: look") + [tokenizer.eos_token_id],
                          tokenizer.encode("REASON: the desk is far and"), 0.7, 0.1, 0)  # the second cut off

    def full_sequence(m, response):  # token by token, one sequence
        ids = state + response
        logprobs = torch.log_softmax(m(input_ids=torch.tensor([ids])).logits[0], dim=-1)
        return sum(logprobs[t - 1, ids[t]] for t in range(len(state), len(ids)))

    def loss_and_grad(logprobs_of):
        model.zero_grad()
        with torch.no_grad():
            ref = logprobs_of(reference)
        mine = logprobs_of(model)
        loss, _ = dpo_loss(mine[:1], mine[1:], ref[:1], ref[1:], beta=0.5)
        loss.backward()
        return mine.detach(), loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    shared = loss_and_grad(lambda m: context_logprobs(m, [pair], "cpu")[0])
    full = loss_and_grad(lambda m: torch.stack([full_sequence(m, pair.chosen), full_sequence(m, pair.rejected)]))
    for a, b in zip(shared, full):  # float32 sums in another order: gradients agree to ~1e-5
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-3, atol=1e-4)


def test_the_pairs_of_a_context_off_one_encoding_equal_each_pair_alone(tiny_model):
    """Pairs at three states of one episode, all hanging off its longest state in one row: the
    same log-probabilities, DPO loss and gradient as each pair off its own state."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model)
    turn = tokenizer.encode("ACTION: go to desk 1<|im_end|>\n<|im_start|>user\nYou see a mug.<|im_end|>\n"
                            "<|im_start|>assistant\n")
    first = tokenizer.encode("<|im_start|>user\nYour task is to: look.<|im_end|>\n<|im_start|>assistant\n")
    states = [first, first + turn, first + turn + turn]
    pairs = [PreferencePair(s, tokenizer.encode(f"ACTION: take mug {i}"), tokenizer.encode("ACTION: look"), 0.9, 0.1, 0)
             for i, s in enumerate(states)]
    pairs[1] = PreferencePair(states[1], tokenizer.encode("ACTION: look") + [tokenizer.eos_token_id],
                              tokenizer.encode("REASON: the desk"), 0.6, 0.2, 0)

    def loss_and_grad(logprobs_of):
        model.zero_grad()
        with torch.no_grad():
            ref = logprobs_of(reference)
        mine = logprobs_of(model)
        loss, _ = dpo_loss(mine[:, 0], mine[:, 1], ref[:, 0], ref[:, 1], beta=0.5)
        loss.backward()
        return mine.detach(), loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    grouped = loss_and_grad(lambda m: context_logprobs(m, pairs, "cpu"))
    alone = loss_and_grad(lambda m: torch.cat([context_logprobs(m, [p], "cpu") for p in pairs]))
    for a, b in zip(grouped, alone):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="not prefixes of one context"):
        context_logprobs(model, [pairs[0], PreferencePair(turn, [1], [2], 0.5, 0.1, 0)], "cpu")


def test_a_contexts_row_keeps_the_leading_pairs_that_fit():
    pairs = [PreferencePair([1] * n, [2] * 3, [3] * 2, 0.9, 0.1, 0) for n in (10, 20, 30)]
    assert fitting_pairs(pairs, max_seq_len=24) == pairs[:1]  # 20 + 2 x 5 > 24
    assert fitting_pairs(pairs, max_seq_len=30) == pairs[:2]
    assert fitting_pairs(pairs, max_seq_len=45) == pairs
    assert fitting_pairs(pairs, max_seq_len=14) == []


def test_contexts_hold_an_episodes_distinct_states_in_order_and_start_anew_at_a_restart():
    import pyarrow as pa

    from learners.qtargets import context_states

    rows = [  # (episode, step, context_start, prompt ids, response ids)
        ("g#0", 0, True, [1, 2], [3]), ("g#0", 1, False, [4], [5]),
        ("g#0", 2, True, [6], [7]), ("g#0", 3, False, [8], [9]),  # a restart at step 2
        ("g#1", 0, True, [1, 2], [30]), ("g#1", 1, False, [40], [50]),  # the same first state as g#0
        ("h#0", 0, True, [11], [12])]
    table = pa.table({"episode_id": [r[0] for r in rows], "step": [r[1] for r in rows],
                      "context_start": [r[2] for r in rows], "prompt_ids": [r[3] for r in rows],
                      "response_ids": [r[4] for r in rows], "split": ["train"] * 6 + ["val"]})
    assert context_states(table, "train") == [[[1, 2], [1, 2, 3, 4]], [[6], [6, 7, 8]], [[1, 2, 30, 40]]]
    assert context_states(table, "val") == [[[11]]]


def test_the_prms_favourite_is_chosen_and_ties_are_skipped():
    texts, ids = ["ACTION: look", "ACTION: go to shelf 1"], [[1], [2, 3]]
    pair = prefer([9], texts, ids, [0.1, 0.7], policy_version=3)
    assert (pair.chosen, pair.rejected, pair.chosen_score, pair.policy_version) == ([2, 3], [1], 0.7, 3)
    assert prefer([9], ["ACTION: look", "ACTION: look"], ids, [0.1, 0.7], 0) is None  # the same response twice
    assert prefer([9], ["ACTION: look", "ACTION: go"], ids, [0.5, 0.5], 0) is None
    # Two wordings of one command: the PRM learnt one Q per command, so their gap is noise.
    assert prefer([9], ["REASON: a.\nACTION: look", "ACTION: look"], ids, [0.1, 0.7], 0) is None
    # Of more samples, the best and the worst command; a command's first sample stands for it.
    texts = ["ACTION: look", "ACTION: go to shelf 1", "REASON: b.\nACTION: look", "ACTION: take mug 1"]
    pair = prefer([9], texts, [[1], [2], [3], [4]], [0.5, 0.9, 0.0, 0.2], 0)
    assert (pair.chosen, pair.rejected, pair.rejected_score) == ([2], [4], 0.2)


def test_a_steps_dpo_loss_is_the_mean_over_its_kept_pairs_whatever_the_ties():
    micro_batches = [[0.2, 0.4], [], [0.9], [0.5, None]]  # per-pair losses of 4 micro-batches; [] = all ties
    kept = [[x for x in m if x is not None] for m in micro_batches]
    pairs = sum(len(k) for k in kept)
    weighted = [kept_pair_weight(len(k), pairs, len(micro_batches)) * (sum(k) / len(k)) for k in kept if k]
    assert sum(weighted) / len(micro_batches) == pytest.approx((0.2 + 0.4 + 0.9 + 0.5) / 4)


@pytest.mark.parametrize("checkpoint_every", [2, 4], ids=["from_the_step_2_checkpoint", "from_the_start"])
def test_online_dpo_trains_and_pushes_its_weights_to_the_policy_server(ray_local, tiny_model, tiny_prm, tmp_path,
                                                                        checkpoint_every):
    """The learner fails at step 3, after pushing version 11 at step 2. The restarted job first
    serves its own weights again, the step-2 checkpoint's (as 11) or, with no checkpoint before
    step 4, the initial ones (as 10), so no pair is sampled by weights ahead of the learner's;
    the versions then end where an unbroken run's do, each step logged once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from learners.dpo import train_dpo
    from policy_server import SamplingParams, start_policy_servers
    from policy_server.hf_engine import HFEngine
    from prm_service import start_prm_servers
    from tests.conftest import small_cfg

    prompt = "<|im_start|>user\nYour task is to: put a clean mug in coffeemachine. Room {}<|im_end|>\n" \
             "<|im_start|>assistant\n"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    pq.write_table(pa.table({  # stage 1's step rows: 8 one-step episodes, each state its own
        "episode_id": [f"g{i}#0" for i in range(8)], "step": [0] * 8, "split": ["train"] * 8,
        "context_start": [True] * 8, "prompt_ids": [tokenizer.encode(prompt.format(i)) for i in range(8)],
        "response_ids": [tokenizer.encode("ACTION: look")] * 8}), tmp_path / "qtargets.parquet")
    cfg = small_cfg(**{"learner.num_workers": 2, "dpo.batch_size": 4, "dpo.micro_batch_size": 1, "dpo.lr": 1e-2,
                       "dpo.beta": 0.5, "dpo.warmup_steps": 1, "dpo.epochs": 2, "dpo.push_every": 2,
                       "dpo.checkpoint_every": checkpoint_every, "learner.fail_at_step": 3, "learner.max_failures": 1,
                       "dpo.max_new_tokens": 6, "dpo.temperature": 1.0, "dpo.samples_per_state": 3,
                       "policy.model": tiny_model,
                       "policy.dtype": "float32"})  # its outputs are compared with a float32 engine's
    policy = start_policy_servers(cfg.policy, tiny_model, seed=0)
    prm = start_prm_servers(cfg.prm_service, tiny_prm)
    try:
        policy.load_weights(AutoModelForCausalLM.from_pretrained(tiny_model).state_dict(), version=10)
        out = train_dpo(cfg, tmp_path / "qtargets.parquet", tiny_model, policy, prm, tmp_path / "dpo")
        records = [json.loads(line) for line in (tmp_path / "dpo/metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        assert all(0 <= r["policy_lag"] <= 1 and 0 <= r["tie_rate"] <= 1 for r in records)  # max_policy_lag 1
        assert records[0]["policy_lag"] == records[1]["policy_lag"] == 0  # nothing pushed before step 2 ended
        assert any(r["tie_rate"] < 1 for r in records)  # pairs were trained on
        assert policy.versions() == [12]  # pushed after steps 2 and 4
        # The server now generates what the exported policy generates, not what it started with.
        greedy = SamplingParams(max_tokens=8)
        served = ray.get(policy.generate([prompt.format(0), prompt.format(5)], greedy))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the server computes (policy.torch_threads = num_cpus = 1): same numerics
        try:
            exported = HFEngine(str(out), device="cpu").generate([prompt.format(0), prompt.format(5)], greedy)
        finally:
            torch.set_num_threads(threads)
        assert [g[0].token_ids for g in served.generations] == [g[0].token_ids for g in exported]
    finally:
        policy.shutdown()
        prm.shutdown()
    start = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert any(not torch.equal(start[k], trained[k]) for k in start)


def test_reward_hacking_monitor_measures_prm_score_and_success_per_version(ray_local, tiny_model, tiny_prm,
                                                                           ood_games, tmp_path):
    from policy_server import SamplingParams, start_policy_servers
    from prm_service import start_prm_servers
    from learners import RewardHackingMonitor
    from rollout_workers import EpisodeTask, start_rollout_workers
    from tests.conftest import small_cfg

    cfg = small_cfg(**{"policy.model": tiny_model, "policy.max_new_tokens": 6, "env.max_steps": 3,
                       "rollout.num_workers": 1, "rollout.envs_per_worker": 2})
    policy = start_policy_servers(cfg.policy, tiny_model, seed=0)
    prm = start_prm_servers(cfg.prm_service, tiny_prm)
    workers = start_rollout_workers(cfg, "llm", tiny_model, policy)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    states = [tokenizer.encode(s) for s in (
        "<|im_start|>user\nYour task is to: look.<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nYour task is to: put a mug in cabinet.<|im_end|>\n<|im_start|>assistant\n")]
    monitor = RewardHackingMonitor(policy, prm, workers, 2, states, [EpisodeTask(g, 0, 0) for g in ood_games[:2]],
                                   SamplingParams(max_tokens=6), tmp_path, poll_s=0.2)
    try:
        monitor.start()
        policy.load_weights(AutoModelForCausalLM.from_pretrained(tiny_model).state_dict(), version=1)
        records = monitor.stop()
        assert monitor.error is None  # the watching thread ran to the end
    finally:
        for w in workers:
            ray.kill(w)
        policy.shutdown()
        prm.shutdown()
    assert records[-1]["version"] == 1 and [r["version"] for r in records] == sorted({r["version"] for r in records})
    for r in records:
        assert isinstance(r["prm_mean_score"], float) and r["success_rate"] == 0.0 and r["games"] == 2
        first, last = r["played_by_versions"]  # the weights that played its games: this version or later
        assert r["version"] <= first <= last <= records[-1]["version"]
    logged = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    assert logged == records
