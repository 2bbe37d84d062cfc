"""AgentPRM's critic: Q-targets, the PRM learner (both losses), the PRM service, Best-of-N."""
import asyncio
import json
import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from learners import build_dataset, train_prm
from learners.prm import weighted_auc
from learners.qtargets import preference_pairs, q_targets, split_games
from policy_server import Generation
from prm_service import PRMScorer, ScoreRequest, load_prm, start_prm_servers
from rollout_workers import SCHEMA, StepRecord
from rollout_workers.worker import RolloutWorker
from tests.conftest import small_cfg

PROMPT = "<|im_start|>user\nYour task is to: put a clean mug in coffeemachine.<|im_end|>\n<|im_start|>assistant\n"


def episode(game: str, index: int, prompts: list[str], actions: list[str], won: bool) -> list[StepRecord]:
    last = len(actions) - 1
    return [StepRecord(game_id=game, task_type="pick", episode_id=f"{game}#{index}", step=t, task="t", room="r",
                       admissible_commands=[], prompt=p, prompt_ids=[], context_start=t == 0, context_rule=False,
                       response=f"ACTION: {a}", response_ids=[], action=a, valid=True, observation="o",
                       reward=float(won and t == last), done=t == last, won=won and t == last, policy_version=0,
                       worker_id=0)
            for t, (p, a) in enumerate(zip(prompts, actions))]


def table(*episodes) -> pa.Table:
    return pa.Table.from_pylist([vars(s) for e in episodes for s in e], schema=SCHEMA)


def test_q_targets_merge_discount_rescale_and_pair():
    g = 0.9
    steps = table(episode("g", 0, ["s0", "s1"], ["a", "b"], won=True),          # returns g, 1
                  episode("g", 1, ["s0", "s1x", "s2"], ["a", "c", "d"], won=False),  # -g^2, -g, -1
                  episode("g", 2, ["s0"], ["e"], won=False))                    # -1
    rows = {(r["prompt"], r["action"]): r for r in q_targets(steps, g, "to_go", set()).to_pylist()}
    assert len(rows) == 5  # (s0, a) was visited twice and is merged
    merged = rows[("s0", "a")]
    assert merged["visits"] == 2 and merged["wins"] == 1
    assert merged["mc_return"] == pytest.approx((g - g ** 2) / 2)
    assert merged["target"] == pytest.approx(((g - g ** 2) / 2 + 1) / 2)  # rescaled to [0, 1]
    assert rows[("s1", "b")]["target"] == pytest.approx(1.0) and rows[("s2", "d")]["target"] == pytest.approx(0.0)
    assert rows[("s1x", "c")]["mc_return"] == pytest.approx(-g)
    from_start = {(r["prompt"], r["action"]): r for r in q_targets(steps, g, "from_start", set()).to_pylist()}
    assert from_start[("s1", "b")]["mc_return"] == pytest.approx(g)  # gamma^t r, t = 1
    # An episode from the reset distribution starts at the game's step 3: t counts from the game's start.
    reset = table([replace(s, step=s.step + 3) for s in episode("h", 0, ["r3", "r4"], ["a", "b"], won=True)])
    assert [r["mc_return"] for r in q_targets(reset, g, "from_start", set()).sort_by("prompt").to_pylist()] == \
        pytest.approx([g ** 3, g ** 4])
    assert [r["mc_return"] for r in q_targets(reset, g, "to_go", set()).sort_by("prompt").to_pylist()] == \
        pytest.approx([g, 1])
    # Pairs: only s0 has two actions; a (MC estimate 0.045) beats e (-1) by 1.045 on the [-1, 1] scale.
    pairs = preference_pairs(q_targets(steps, g, "to_go", set()), margin=1.04).to_pylist()
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("s0", "ACTION: a", "ACTION: e")]
    assert preference_pairs(q_targets(steps, g, "to_go", set()), margin=1.05).num_rows == 0


def test_split_is_by_task_folder_and_seeded():
    games = [f"task{i}/trial{j}" for i in range(20) for j in range(2)]
    val = split_games(games, 0.1, seed=0)
    assert len(val) == 4 and val == split_games(list(reversed(games)), 0.1, seed=0)
    assert {g.split("/")[0] for g in val} == {g.split("/")[0] for g in val if g.endswith("trial0")}  # both trials
    # The trials of a task share their first state: it lands in one split only.
    steps = table(*[episode(g, 0, [f"{g.split('/')[0]}-s0", f"{g}-s1"], ["a", "b"], won=True) for g in games])
    rows = q_targets(steps, 0.95, "to_go", val).to_pylist()
    assert {r["game_id"] for r in rows if r["split"] == "val"} == val
    first = [r for r in rows if r["prompt"].endswith("-s0")]
    assert len(first) == 20 and all(r["visits"] == 2 for r in first)


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
    val = [p for p in pq.read_table(toy_dataset / "pairs.parquet").to_pylist() if p["split"] == "val"]
    scores = scorer.score([ScoreRequest(p["prompt"], [p["chosen"], p["rejected"]]) for p in val])
    assert all(chosen > rejected for chosen, rejected in scores)


REQUESTS = [ScoreRequest(PROMPT, ["ACTION: go to shelf 1", "ACTION: look", ""]),
            ScoreRequest(PROMPT + "You see a mug.", ["REASON: the mug is here.\nACTION: take mug 1"]),
            ScoreRequest(PROMPT, ["ACTION: examine desk 1"])]


@pytest.mark.parametrize("share_prompt", [True, False])
def test_a_bfloat16_prm_scores_with_a_float32_head(tiny_prm, share_prompt):
    import torch

    scores = np.concatenate(PRMScorer(tiny_prm, dtype="bfloat16", share_prompt=share_prompt).score(REQUESTS))
    on_bf16_grid = torch.tensor(scores).to(torch.bfloat16).double().numpy() == scores
    assert not on_bf16_grid.all()  # a bfloat16 head would round every Q to 8 bits of mantissa


def test_shared_prompt_scores_equal_full_sequences_and_the_classifiers_own_forward(tiny_prm):
    import torch

    shared, full = PRMScorer(tiny_prm, share_prompt=True), PRMScorer(tiny_prm, share_prompt=False)
    a, b = shared.score(REQUESTS), full.score(REQUESTS)
    assert shared.forward_passes == 2 and full.forward_passes == 1
    assert shared.prompt_rows == 2 and full.prompt_rows == 5  # 2 distinct prompts, encoded once each
    np.testing.assert_allclose(np.concatenate(a), np.concatenate(b), rtol=1e-4, atol=1e-4)
    model, tokenizer = load_prm(tiny_prm)
    for request, scores in zip(REQUESTS, a):
        for response, score in zip(request.responses, scores):
            ids = tokenizer.encode(request.prompt, add_special_tokens=False) + tokenizer.encode(
                response, add_special_tokens=False)
            assert score == pytest.approx(model(torch.tensor([ids])).logits.item(), abs=1e-4)


def test_service_batches_concurrent_requests_and_reloads_by_version(ray_local, tiny_prm, tiny_model, tmp_path):
    pairs = sum(len(r.responses) for r in REQUESTS) * 4
    cfg = small_cfg(**{"prm_service.max_batch_size": pairs, "prm_service.max_wait_ms": 5000,
                       "prm_service.dtype": "float32"})  # compared with a float32 scorer
    prm = start_prm_servers(cfg.prm_service, tiny_prm)
    try:
        results = ray.get([prm.score(r.prompt, r.responses) for r in REQUESTS * 4])
        (stats,) = prm.stats()
        assert stats["requests"] == 12 and stats["pairs"] == pairs
        assert stats["batches"] < 12 and stats["forward_passes"] == 2 * stats["batches"]
        expected = PRMScorer(tiny_prm, share_prompt=False).score(REQUESTS * 4)
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
        after = ray.get(prm.score(PROMPT, ["ACTION: look"]))
        assert after.prm_version == 2
        assert after.scores[0] == pytest.approx(PRMScorer(str(tmp_path / "v2")).score(
            [ScoreRequest(PROMPT, ["ACTION: look"])])[0][0], abs=1e-4)
    finally:
        prm.shutdown()


class FixedScores:
    """A stand-in PRM client: scores each response by a table, and records what it was asked."""

    def __init__(self, table: dict[str, float]):
        self.table, self.asked = table, []

    async def score(self, prompt: str, responses: list[str]):
        from prm_service import ScoreResult

        self.asked.append(list(responses))
        return ScoreResult([self.table[r] for r in responses], prm_version=3)


def best_of_n(responses: list[str], scores: dict[str, float]):
    worker = RolloutWorker.__new__(RolloutWorker)  # only the PRM is needed for the choice
    worker.prm = FixedScores(scores)
    samples = [Generation(r, [i], [0.0], "stop") for i, r in enumerate(responses)]
    return asyncio.run(worker._best_of_n(PROMPT, samples, policy_version=5)), worker.prm.asked


def test_best_of_n_plays_the_argmax_of_distinct_commands():
    responses = ["ACTION: look", "REASON: go.\nACTION: go to shelf 1", "ACTION:  Look.", "ACTION: take mug 1"]
    action, asked = best_of_n(responses, {"ACTION: look": 0.1, "REASON: go.\nACTION: go to shelf 1": 0.7,
                                          "ACTION: take mug 1": 0.3})
    assert asked == [["ACTION: look", "REASON: go.\nACTION: go to shelf 1", "ACTION: take mug 1"]]  # look once
    assert action.response == "REASON: go.\nACTION: go to shelf 1" and action.candidates == 3
    assert action.response_ids == [1]  # the chosen sample's ids, as generated
    assert action.prm_score == 0.7 and action.policy_version == 5


def test_best_of_n_copes_when_every_sample_is_invalid():
    action, asked = best_of_n(["blah", "blah", "", "fly away"], {"blah": -1.0, "": -2.0, "fly away": -0.5})
    assert asked == [["blah", "", "fly away"]]
    assert action.response == "fly away" and action.candidates == 3


def test_best_of_n_does_not_ask_the_prm_when_every_sample_sends_the_same_command():
    action, asked = best_of_n(["ACTION: look", "REASON: see.\nACTION: look", "ACTION: look"], {})
    assert asked == [] and action.response == "ACTION: look"
    assert action.candidates == 1 and action.prm_score is None and action.policy_version == 5


def test_best_of_n_rollout_with_the_prm_service(ray_local, tiny_model, tiny_prm, ood_games, tmp_path):
    from policy_server import start_policy_servers
    from rollout_workers import EpisodeTask, read_steps, run_episodes, start_rollout_workers

    cfg = small_cfg(**{"policy.model": tiny_model, "policy.best_of_n": 4, "policy.temperature": 1.0,
                       "policy.max_new_tokens": 6, "env.max_steps": 3, "rollout.num_workers": 1,
                       "rollout.envs_per_worker": 2, "prm_service.model": tiny_prm})
    policy = start_policy_servers(cfg.policy, tiny_model, seed=0)
    prm = start_prm_servers(cfg.prm_service, tiny_prm)
    workers = start_rollout_workers(cfg, "llm", tiny_model, policy, prm)
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
    assert stats["requests"] == len(scored) and stats["pairs"] == sum(s["candidates"] for s in scored)
