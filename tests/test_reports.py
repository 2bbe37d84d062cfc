"""Reports: Best-of-N's choices and the paired comparison of two evaluations."""
import json
import subprocess
import sys

import pytest

from configs import REPO_ROOT
from reports.best_of_n import choice_stats
from reports.paired import format_paired, load_evaluation, paired
from rollout_workers.records import StepRecord, write_episode


def test_best_of_n_choice_stats_on_hand_made_steps():
    def step(action, candidates, samples, scores, admissible=("look", "go to desk 1")):
        return dict(action=action, candidate_actions=candidates, candidate_samples=samples, candidate_scores=scores,
                    admissible_commands=list(admissible))
    steps = [step("look", ["look", "fly"], [15, 1], [0.5, 0.1]),  # the majority
             step("fly", ["look", "fly"], [15, 1], [0.1, 0.5]),  # one sample, invalid over a valid one
             step("go to desk 1", ["look", "go to desk 1", "x"], [8, 7, 1], [0.1, 0.6, 0.2]),
             step("x", ["x", "y"], [8, 8], [0.9, 0.1]),  # a tie counts as the majority; no valid offered
             step("look", ["look"], [16], None)]  # no choice: not counted
    stats = choice_stats(steps)
    assert stats["steps_with_a_choice"] == 4 and stats["mean_candidates"] == 2.25
    assert stats["played_the_majority"] == 0.5 and stats["played_a_single_sample"] == 0.25
    assert stats["played_invalid_over_a_valid"] == round(1 / 3, 4)
    assert choice_stats(steps[-1:]) == {"steps_with_a_choice": 0}


def test_paired_comparison_counts_only_the_shared_games_and_gives_the_exact_mcnemar_p(tmp_path):
    # b wins 9 games a loses, a wins 1 game b loses, both win 5: p = 2 * (C(10,0) + C(10,1)) / 2^10
    a = {"won_per_game": {**{f"d{i}": [0, 1] for i in range(9)}, "e": [1, 1], **{f"s{i}": [1, 1] for i in range(5)},
                          "only_in_a": [1, 1]}}
    b = {"won_per_game": {**{f"d{i}": [1, 1] for i in range(9)}, "e": [0, 1], **{f"s{i}": [1, 1] for i in range(5)}}}
    result = paired(a, b, ("pi0", "pi1"))
    assert result["games"] == 15 and (result["a_only"], result["b_only"]) == (1, 9)
    assert result["a_success"] == 6 / 15 and result["b_success"] == 14 / 15
    assert result["p_value"] == pytest.approx(22 / 1024)
    assert paired(a, a)["p_value"] == 1.0  # no discordant game
    assert "p = 0.0215" in format_paired(result)
    with pytest.raises(ValueError, match="share no game"):
        paired(a, {"won_per_game": {"other": [1, 1]}})
    with pytest.raises(ValueError, match="one per game"):
        paired(a, {"won_per_game": {"e": [1, 2]}})
    # An evaluation still running, read from its shards: paired on the games it finished.
    for game, won in (("d0", True), ("e", False)):
        write_episode(tmp_path, [StepRecord(
            game_id=game, task_type="pick", episode_id=f"{game}#0", step=0, task="t", room="r", admissible_commands=[],
            prompt="p", prompt_ids=[], context_start=True, context_rule=False, response="r", response_ids=[],
            action="a", valid=True, observation="o", reward=float(won), done=True, won=won, policy_version=0,
            worker_id=0)])
    running = paired(a, load_evaluation(tmp_path))
    assert running["games"] == 2 and (running["a_only"], running["b_only"]) == (1, 1)
    (tmp_path / "a.json").write_text(json.dumps(a))
    cli = subprocess.run([sys.executable, "-m", "reports.paired", str(tmp_path / "a.json"), str(tmp_path),
                          "--names", "pi0", "pi1", "--out", str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "2 games: pi0 50.0%, pi1 50.0%" in cli.stdout, cli.stderr
    assert json.loads((tmp_path / "p.json").read_text()) == {**running, "a": "pi0", "b": "pi1"}
    assert (tmp_path / "p.png").stat().st_size > 0
