"""AgentPRM's critic: Q-targets, the PRM learner (both losses), the PRM service, Best-of-N."""
import asyncio
import json
import math
import os
import shutil
import signal
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from learners import build_dataset, train_prm
from learners.prm import (EpisodeSequence, StatePair, absolute_loss, pair_scores, relative_loss,
                          weighted_auc)
from learners.qtargets import distinct_state_actions, preference_pairs, q_targets, split_games, state_ids
from models.prm import last_token_scores, load_prm, turn_scores
from policy_server import Generation
from prm_service import PRMScorer, ScoreRequest, start_prm_servers
from rollout_workers import SCHEMA, StepRecord
from rollout_workers.worker import RolloutWorker
from serving.replicas import unrecoverable
from tests.conftest import small_cfg

PROMPT = "<|im_start|>user\nYour task is to: put a clean mug in coffeemachine.<|im_end|>\n<|im_start|>assistant\n"


def ids_of(text: str) -> list[int]:
    """Stand-in token ids for the Q-target tests (no model reads them)."""
    return [ord(c) for c in text]


def episode(game: str, index: int, prompts: list[str], actions: list[str], won: bool,
            encode=ids_of) -> list[StepRecord]:
    """An episode whose step t is fed `prompts[t]` (the ids that extend the sequence, `encode`d)
    and answers `actions[t]`: its state is everything before, so equal histories are equal states."""
    last = len(actions) - 1
    return [StepRecord(game_id=game, task_type="pick", episode_id=f"{game}#{index}", step=t, task="t", room="r",
                       admissible_commands=[], prompt=p, prompt_ids=encode(p), context_start=t == 0,
                       context_rule=False, response=f"ACTION: {a}", response_ids=encode(f"ACTION: {a}"), action=a,
                       valid=True,
                       observation="o", reward=float(won and t == last), done=t == last, won=won and t == last,
                       policy_version=0, worker_id=0)
            for t, (p, a) in enumerate(zip(prompts, actions))]


def table(*episodes) -> pa.Table:
    return pa.Table.from_pylist([vars(s) for e in episodes for s in e], schema=SCHEMA)


def by_step(targets: pa.Table) -> dict[tuple[str, int], dict]:
    return {(r["episode_id"], r["step"]): r for r in targets.to_pylist()}


def test_state_ids_are_the_whole_prompt_and_restart_with_a_context():
    rows = [{"context_start": True, "prompt_ids": [1, 2], "response_ids": [3]},
            {"context_start": False, "prompt_ids": [4], "response_ids": [5, 6]},
            {"context_start": True, "prompt_ids": [7, 8], "response_ids": [9]}]
    assert state_ids(rows) == [[1, 2], [1, 2, 3, 4], [7, 8]]


def test_q_targets_merge_discount_rescale_and_pair():
    g = 0.9
    steps = table(episode("g", 0, ["s0", "s1"], ["a", "b"], won=True),          # returns g, 1
                  episode("g", 1, ["s0", "s1x", "s2"], ["a", "c", "d"], won=False),  # -g^2, -g, -1
                  episode("g", 2, ["s0"], ["e"], won=False))                    # -1
    targets = q_targets(steps, g, "to_go", set())
    rows = by_step(targets)
    assert targets.num_rows == 6 and len(distinct_state_actions(targets)) == 5  # (s0, a) twice: merged
    for merged in (rows[("g#0", 0)], rows[("g#1", 0)]):  # both visits carry the merged estimate
        assert merged["visits"] == 2 and merged["wins"] == 1
        assert merged["mc_return"] == pytest.approx((g - g ** 2) / 2)
        assert merged["target"] == pytest.approx(((g - g ** 2) / 2 + 1) / 2)  # rescaled to [0, 1]
    assert rows[("g#0", 1)]["target"] == pytest.approx(1.0) and rows[("g#1", 2)]["target"] == pytest.approx(0.0)
    assert rows[("g#1", 1)]["mc_return"] == pytest.approx(-g)
    assert rows[("g#0", 1)]["state_key"] != rows[("g#1", 1)]["state_key"]  # s1 and s1x: other histories
    from_start = by_step(q_targets(steps, g, "from_start", set()))
    assert from_start[("g#0", 1)]["mc_return"] == pytest.approx(g)  # gamma^t r, t = 1
    # An episode from the reset distribution starts at the game's step 3: t counts from the game's start.
    reset = table([replace(s, step=s.step + 3) for s in episode("h", 0, ["r3", "r4"], ["a", "b"], won=True)])
    assert [r["mc_return"] for r in q_targets(reset, g, "from_start", set()).to_pylist()] == \
        pytest.approx([g ** 3, g ** 4])
    assert [r["mc_return"] for r in q_targets(reset, g, "to_go", set()).to_pylist()] == pytest.approx([g, 1])
    # Pairs: only s0 has two actions; a (MC estimate 0.045) beats e (-1) by 1.045 on the [-1, 1] scale.
    pairs = preference_pairs(targets, margin=1.04).to_pylist()
    assert [(p["chosen_episode"], p["chosen_step"], p["rejected_episode"], p["rejected_step"]) for p in pairs] == \
        [("g#0", 0, "g#2", 0)]
    assert preference_pairs(targets, margin=1.05).num_rows == 0


def test_split_is_by_task_folder_and_seeded():
    games = [f"task{i}/trial{j}" for i in range(20) for j in range(2)]
    val = split_games(games, 0.1, seed=0)
    assert len(val) == 4 and val == split_games(list(reversed(games)), 0.1, seed=0)
    assert {g.split("/")[0] for g in val} == {g.split("/")[0] for g in val if g.endswith("trial0")}  # both trials
    # The trials of a task share their first state: it lands in one split only.
    steps = table(*[episode(g, 0, [f"{g.split('/')[0]}-s0", f"{g}-s1"], ["a", "b"], won=True) for g in games])
    rows = q_targets(steps, 0.95, "to_go", val).to_pylist()
    assert {r["game_id"] for r in rows if r["split"] == "val"} == val
    first = [r for r in rows if r["step"] == 0]
    assert len(first) == 40 and all(r["visits"] == 2 for r in first)


def test_split_holds_out_folders_with_and_without_a_win():
    """AgentPRM's validation needs both outcomes for its AUC: folders with a won episode are
    sampled apart from the rest, and training keeps at least one of them."""
    games = [f"task{i}/trial{j}" for i in range(20) for j in range(2)]
    for won_folders in (range(2), range(6), range(19)):
        won = {f"task{i}/trial0" for i in won_folders}
        val = {g.split("/")[0] for g in split_games(games, 0.2, seed=0, won_games=won)}
        val_won = {f for f in val if int(f[4:]) in won_folders}
        assert len(val_won) == min(math.ceil(0.2 * len(won_folders)), len(won_folders) - 1) >= 1
        assert len(val - val_won) == min(math.ceil(0.2 * (20 - len(won_folders))), 20 - len(won_folders) - 1)
    # A single folder with a win stays in training: the PRM must see a success to learn from.
    val = split_games(games, 0.2, seed=0, won_games={"task3/trial1"})
    assert not any(g.startswith("task3/") for g in val) and len(val) == 2 * 4


def test_weighted_auc_by_hand():
    # positives at 0.9 (x2) and 0.5 (x1); negatives at 0.5 (x1) and 0.1 (x2)
    scores, pos, neg = np.array([0.9, 0.5, 0.1]), np.array([2, 1, 0]), np.array([0, 1, 2])
    # pos-neg pairs: 3 x 3 = 9; wins: 0.9 beats all 3 (x2 = 6), 0.5 beats 2, ties 1 (half) -> 8.5 / 9
    assert weighted_auc(scores, pos, neg) == pytest.approx(8.5 / 9)
    assert weighted_auc(scores, pos, np.zeros(3)) is None


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory):
    """12 games, each state seen with a winning action and a losing one: separable by the action."""
    states = [f"{PROMPT}You are in room {i}. Admissible commands: look, take mug {i}" for i in range(12)]
    steps = table(*[e for i, s in enumerate(states) for e in (episode(f"game{i}", 0, [s], [f"take mug {i}"], True),
                                                               episode(f"game{i}", 1, [s], ["look"], False))])
    out = tmp_path_factory.mktemp("qtargets")
    summary = build_dataset(steps, out, gamma=0.95, discount="to_go", margin=0.03, val_fraction=0.25, seed=0)
    assert summary["unique_state_actions"] == 24 and summary["states_with_several_actions"] == 12
    assert summary["pairs"] == 12 and summary["val_games"] == 3 and summary["target_histogram"]["counts"][0] == 12
    return out


def prm_cfg(loss: str):
    return small_cfg(**{"learner.num_workers": 2, "prm.loss": loss, "prm.batch_size": 4, "prm.micro_batch_size": 1,
                        "prm.lr": 3e-3, "prm.warmup_steps": 1, "prm.epochs": 4, "prm.checkpoint_every": 100})


@pytest.mark.parametrize("loss", ["absolute", "relative"])
def test_prm_learner_lowers_its_loss_and_ranks_held_out_actions(ray_local, tiny_model, toy_dataset, tmp_path, loss):
    report = train_prm(prm_cfg(loss), toy_dataset, tiny_model, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    n = len(records) // 3
    assert np.mean([r["loss"] for r in records[-n:]]) < 0.5 * np.mean([r["loss"] for r in records[:n]])
    # Held-out games: the winning action scores above the losing one at every state.
    assert report["auc"] == 1.0 and report["pair_accuracy"] == 1.0 and report["val_pairs"] == 3
    if loss == "absolute":  # sigmoid(Q) was fit to the targets (0 and 1 here)
        assert report["expected_calibration_error"] < 0.25
    else:  # pairs fix Q only up to a constant: no calibration to report
        assert report["expected_calibration_error"] is None and report["reliability"] == []
    # The exported folder is a Hugging Face sequence classifier that the service loads.
    scorer = PRMScorer(str(tmp_path / "prm"))
    targets = pq.read_table(toy_dataset / "qtargets.parquet")
    rows = by_step(targets)
    val = [p for p in pq.read_table(toy_dataset / "pairs.parquet").to_pylist() if p["split"] == "val"]
    scores = scorer.score([ScoreRequest(list(rows[(p["chosen_episode"], 0)]["prompt_ids"]),
                                        [list(rows[(p["chosen_episode"], 0)]["response_ids"]),
                                         list(rows[(p["rejected_episode"], 0)]["response_ids"])]) for p in val])
    assert all(chosen > rejected for chosen, rejected in scores)


def random_episode(seed: int, turns: int = 4, vocab: int = 250) -> tuple[list[list[int]], list[list[int]]]:
    """Each turn's new prompt ids and response ids (the first response empty is allowed too)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(5, vocab, rng.integers(8, 20)).tolist() for _ in range(turns)]
    responses = [rng.integers(5, vocab, rng.integers(1, 6)).tolist() for _ in range(turns)]
    return prompts, responses


def requests(seed: int = 0) -> list[ScoreRequest]:
    """Three requests: a state with three responses (one empty), the next step of that
    episode (its state extends the first), and the first state again."""
    (p0, p1), (r0, r1) = random_episode(seed, turns=2)
    return [ScoreRequest(p0, [r0, r1, []]), ScoreRequest(p0 + r0 + p1, [r1]), ScoreRequest(p0, [r1[:2]])]


@pytest.mark.parametrize("share_prompt", [True, False])
def test_a_bfloat16_prm_scores_with_a_float32_head(tiny_prm, share_prompt):
    import torch

    scores = np.concatenate(PRMScorer(tiny_prm, dtype="bfloat16", share_prompt=share_prompt).score(requests()))
    on_bf16_grid = torch.tensor(scores).to(torch.bfloat16).double().numpy() == scores
    assert not on_bf16_grid.all()  # a bfloat16 head would round every Q to 8 bits of mantissa


def test_shared_state_scores_equal_full_sequences_and_the_classifiers_own_forward(tiny_prm):
    import torch

    reqs = requests()
    shared, full = PRMScorer(tiny_prm, share_prompt=True), PRMScorer(tiny_prm, share_prompt=False)
    a, b = shared.score(reqs), full.score(reqs)
    np.testing.assert_allclose(np.concatenate(a), np.concatenate(b), rtol=1e-4, atol=1e-4)
    # Shared: the first state and its responses; then only the second state's new tokens
    # (its history is cached) and its response; the first state again (the cache now holds
    # the longer one, which is no prefix of it).
    (p0, (r0, r1, _)), (p01, _), (_, (r2,)) = [(r.prompt_ids, r.responses) for r in reqs]
    assert shared.computed_tokens == (len(p0) + len(r0) + len(r1)) + (len(p01) - len(p0) + len(r1)) + \
        (len(p0) + len(r2))
    assert full.computed_tokens == sum(len(r.prompt_ids) + len(x) for r in reqs for x in r.responses)
    model, _ = load_prm(tiny_prm)
    for request, scores in zip(reqs, a):
        for response, score in zip(request.responses, scores):
            # the classifier pools the last non-pad token: these rows hold no pad token
            assert score == pytest.approx(model(torch.tensor([request.prompt_ids + response])).logits.item(), abs=1e-4)


def test_per_turn_q_from_one_pass_equals_each_prefix_scored_alone(tiny_prm):
    import torch

    prompts, responses = random_episode(1, turns=5)
    sequence, ends, alone = [], [], []
    reference, cached = PRMScorer(tiny_prm, share_prompt=False), PRMScorer(tiny_prm, share_prompt=True)
    step_by_step = []
    for p, r in zip(prompts, responses):
        state = sequence + p
        alone += reference.score([ScoreRequest(state, [r])])[0]
        step_by_step += cached.score([ScoreRequest(state, [r])])[0]  # the service, step after step
        sequence = state + r
        ends.append(len(sequence) - 1)
    model, _ = load_prm(tiny_prm)
    with torch.no_grad():
        one_pass = turn_scores(model, sequence, ends, "cpu").tolist()
    np.testing.assert_allclose(one_pass, alone, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(step_by_step, alone, rtol=1e-4, atol=1e-4)
    # the service computed each token of the episode once, and each played response once more
    # (first as a branch, then as history)
    assert cached.computed_tokens == len(sequence) + sum(map(len, responses[:-1])) and cached.forward_passes == 5


def test_episode_losses_equal_their_per_step_forms(tiny_prm):
    """The absolute loss over the turns of episode sequences, and the relative loss with both
    actions off one state, give the loss and gradient of their per-step forms (each (state,
    action) a full sequence)."""
    import torch

    model, _ = load_prm(tiny_prm)
    episodes = [random_episode(seed, turns=3) for seed in (2, 3)]
    targets = [[0.2, 0.9, 1.0], [0.5, 0.0, 0.1]]
    sequences = []
    for (prompts, responses), t in zip(episodes, targets):
        seq = EpisodeSequence([], [], t, [])
        for p, r in zip(prompts, responses):
            seq.input_ids += p + r
            seq.turn_ends.append(len(seq.input_ids) - 1)
        sequences.append(seq)

    def per_step_q(seq: EpisodeSequence) -> torch.Tensor:
        return torch.cat([last_token_scores(model, torch.tensor([seq.input_ids[:end + 1]]),
                                            torch.ones(1, end + 1, dtype=torch.long)) for end in seq.turn_ends])

    def loss_and_grad(loss_fn):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.item(), model.score.weight.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad.clone()

    flat_targets = torch.tensor([t for seq in sequences for t in seq.targets])
    episode_form = loss_and_grad(lambda: absolute_loss(
        torch.cat([turn_scores(model, s.input_ids, s.turn_ends, "cpu") for s in sequences]), flat_targets))
    step_form = loss_and_grad(lambda: absolute_loss(torch.cat([per_step_q(s) for s in sequences]), flat_targets))
    for a, b in zip(episode_form, step_form):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-4, atol=1e-5)

    (prompts, responses), (_, others) = episodes
    pairs = [StatePair(prompts[0], responses[0], others[0]), StatePair(prompts[0] + responses[0] + prompts[1],
                                                                       responses[1], others[1])]
    tree_form = loss_and_grad(lambda: relative_loss(*torch.stack([pair_scores(model, p, "cpu") for p in pairs]).T))

    def full(state, response):
        ids = state + response
        return last_token_scores(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))

    full_form = loss_and_grad(lambda: relative_loss(torch.cat([full(p.state, p.chosen) for p in pairs]),
                                                    torch.cat([full(p.state, p.rejected) for p in pairs])))
    for a, b in zip(tree_form, full_form):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-4, atol=1e-5)


def test_service_batches_concurrent_requests_and_reloads_by_version(ray_local, tiny_prm, tiny_model, tmp_path):
    reqs = requests() * 4
    pairs = sum(len(r.responses) for r in reqs)
    cfg = small_cfg(**{"prm_service.max_batch_size": pairs, "prm_service.max_wait_ms": 5000,
                       "prm_service.dtype": "float32"})  # compared with a float32 scorer
    prm = start_prm_servers(cfg.prm_service, tiny_prm)
    try:
        results = ray.get([prm.score(r.prompt_ids, r.responses) for r in reqs])
        (stats,) = prm.stats()
        assert stats["requests"] == 12 and stats["pairs"] == pairs and stats["batches"] < 12
        expected = PRMScorer(tiny_prm, share_prompt=False).score(reqs)
        np.testing.assert_allclose(np.concatenate([r.scores for r in results]), np.concatenate(expected),
                                   rtol=1e-4, atol=1e-4)
        assert {r.prm_version for r in results} == {0}
        # A newer checkpoint (another head) replaces the weights; an older version is ignored.
        other, tokenizer = load_prm(tiny_model, new_head=True)
        other.score.weight.data.mul_(-1.0)
        other.save_pretrained(tmp_path / "v2")
        tokenizer.save_pretrained(tmp_path / "v2")
        assert prm.load(str(tmp_path / "v2"), version=2) == [2]
        assert prm.load(tiny_prm, version=1) == [2]
        after = ray.get(prm.score(reqs[1].prompt_ids, reqs[1].responses))  # its state was cached by version 0
        assert after.prm_version == 2
        assert after.scores == pytest.approx(PRMScorer(str(tmp_path / "v2")).score([reqs[1]])[0], abs=1e-4)
        # A killed replica comes back serving the latest checkpoint, at its version.
        (server,) = prm.servers
        pid = ray.get(server.__ray_call__.remote(lambda replica: os.getpid()), timeout=60)
        os.kill(pid, signal.SIGKILL)
        restarted = ray.get(prm.score(reqs[1].prompt_ids, reqs[1].responses), timeout=300)
        assert ray.get(server.__ray_call__.remote(lambda replica: os.getpid()), timeout=60) != pid
        assert restarted.prm_version == 2 and restarted.scores == pytest.approx(after.scores, abs=1e-4)
        # Restarted after a checkpoint it cannot load (its folder gone), a replica refuses to score
        # with what it has, and says why in one line.
        shutil.copytree(tmp_path / "v2", tmp_path / "v3")
        assert prm.load(str(tmp_path / "v3"), version=3) == [3]
        shutil.rmtree(tmp_path / "v3")
        os.kill(ray.get(server.__ray_call__.remote(lambda replica: os.getpid()), timeout=60), signal.SIGKILL)
        for cause in ("restarted, it could not load version 3", "loading PRM version 3 from"):
            with pytest.raises(ray.exceptions.RayTaskError) as refused:
                ray.get(prm.score(reqs[1].prompt_ids, reqs[1].responses), timeout=300)
            assert unrecoverable(refused.value).startswith(f"PRM service replica unusable: {cause}")
    finally:
        prm.shutdown()


class FixedScores:
    """A stand-in PRM client: scores each response by a table, and records what it was asked."""

    def __init__(self, table: dict[str, float]):
        self.table, self.asked = table, []

    async def score(self, prompt_ids: list[int], responses: list[list[int]], session: str | None = None):
        from prm_service import ScoreResult

        self.asked.append(list(responses))
        return ScoreResult([self.table[tuple(r)] for r in responses], prm_version=3)


def best_of_n(responses: list[str], scores: dict[str, float]):
    """Best-of-N of `responses` (each sample's ids: its text's) under a PRM scoring by `scores`."""
    worker = RolloutWorker.__new__(RolloutWorker)  # only the PRM is needed for the choice
    worker.prm = FixedScores({tuple(ids_of(r)): q for r, q in scores.items()})
    samples = [Generation(r, ids_of(r), [0.0], "stop") for r in responses]
    action, asked = asyncio.run(worker._best_of_n([1, 2, 3], samples, policy_version=5, episode_id="g#0")), \
        worker.prm.asked
    return action, [["".join(map(chr, ids)) for ids in request] for request in asked]


def test_best_of_n_plays_the_argmax_of_distinct_commands():
    responses = ["ACTION: look", "REASON: go.\nACTION: go to shelf 1", "ACTION:  Look.", "ACTION: take mug 1"]
    action, asked = best_of_n(responses, {"ACTION: look": 0.1, "REASON: go.\nACTION: go to shelf 1": 0.7,
                                          "ACTION: take mug 1": 0.3})
    assert asked == [["ACTION: look", "REASON: go.\nACTION: go to shelf 1", "ACTION: take mug 1"]]  # look once
    assert action.response == "REASON: go.\nACTION: go to shelf 1" and action.candidates == 3
    assert action.response_ids == ids_of("REASON: go.\nACTION: go to shelf 1")  # the chosen sample's, as generated
    assert action.prm_score == 0.7 and action.policy_version == 5
    assert action.candidate_actions == ["look", "go to shelf 1", "take mug 1"]
    assert action.candidate_samples == [2, 1, 1] and action.candidate_scores == [0.1, 0.7, 0.3]


def test_best_of_n_copes_when_every_sample_is_invalid():
    action, asked = best_of_n(["blah", "blah", "", "fly away"], {"blah": -1.0, "": -2.0, "fly away": -0.5})
    assert asked == [["blah", "", "fly away"]]
    assert action.response == "fly away" and action.candidates == 3


def test_best_of_n_does_not_ask_the_prm_when_every_sample_sends_the_same_command():
    action, asked = best_of_n(["ACTION: look", "REASON: see.\nACTION: look", "ACTION: look"], {})
    assert asked == [] and action.response == "ACTION: look"
    assert action.candidates == 1 and action.prm_score is None and action.policy_version == 5
    assert action.candidate_actions == ["look"] and action.candidate_samples == [3]
    assert action.candidate_scores is None


def test_best_of_n_rollout_with_the_prm_service(ray_local, tiny_model, tiny_prm, ood_games, tmp_path):
    from policy_server import start_policy_servers
    from rollout_workers import EpisodeTask, read_steps, run_episodes, start_rollout_workers

    cfg = small_cfg(**{"policy.model": tiny_model, "policy.max_new_tokens": 6, "env.max_steps": 3,
                       "rollout.num_workers": 1, "rollout.envs_per_worker": 2})
    policy = start_policy_servers(cfg.policy, tiny_model, seed=0)
    prm = start_prm_servers(cfg.prm_service, tiny_prm)
    workers = start_rollout_workers(cfg, "llm", tiny_model, policy, temperature=1.0, prm=prm, best_of_n=4)
    try:
        run_episodes(workers, 2, [EpisodeTask(g, 0, i) for i, g in enumerate(ood_games[:2])], tmp_path)
        (stats,) = prm.stats()
    finally:
        for w in workers:
            ray.kill(w)
        policy.shutdown()
        prm.shutdown()
    steps = read_steps(tmp_path).to_pylist()
    assert len(steps) == 6 and all(1 <= s["candidates"] <= 4 for s in steps)
    scored = [s for s in steps if s["candidates"] > 1]  # one distinct command: nothing to score
    assert all((s["prm_score"] is None) == (s["candidates"] == 1) for s in steps)
    assert all(len(s["candidate_actions"]) == s["candidates"] and sum(s["candidate_samples"]) == 4 for s in steps)
    assert all(s["candidate_scores"][s["candidate_actions"].index(s["action"])] == s["prm_score"] for s in scored)
    assert stats["requests"] == len(scored) and stats["pairs"] == sum(s["candidates"] for s in scored)
