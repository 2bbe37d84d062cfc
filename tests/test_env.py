"""The ALFWorld adapter on real games."""
import random
import shutil
import sys
from collections import Counter

import pytest

from envs import TASK_TYPES, AlfworldEnv, DataError, list_games, pick_games


def test_splits_are_sorted_and_typed(data_root, ood_games):
    ids = [g.game_id for g in ood_games]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert len(ood_games) == 134  # the paper's evaluation set, in the shipped copy
    assert {g.task_type for g in ood_games} == set(TASK_TYPES.values())
    assert len(list_games("eval_in_distribution", data_root)) == 140
    assert len(list_games("train_held_out", data_root)) == 200
    train = list_games("train", data_root)
    assert len(train) == 3553 and Counter(g.task_type for g in train) == {
        "pick": 790, "look": 308, "clean": 650, "heat": 459, "cool": 533, "pick_two": 813}


def test_a_pick_of_games_spans_the_task_types_in_their_shares(ood_games):
    # The sorted split's first 40 games are of two task types only.
    assert len({g.task_type for g in ood_games[:40]}) == 2
    six, forty = pick_games(ood_games, 6), pick_games(ood_games, 40)
    assert {g.task_type for g in six} == set(TASK_TYPES.values())
    assert set(six) <= set(forty) and [g.game_id for g in forty] == sorted(g.game_id for g in forty)
    shares = Counter(g.task_type for g in ood_games)
    for task_type, count in Counter(g.task_type for g in forty).items():
        assert abs(count - 40 * shares[task_type] / len(ood_games)) <= 1
    assert pick_games(list(reversed(ood_games)), 40) == forty  # the same games whatever the order given
    assert pick_games(ood_games, None) == ood_games and pick_games(ood_games, 500) == ood_games


def test_the_expert_plays_a_game_the_same_way_whatever_the_global_random_state(ood_games):
    """The expert breaks ties with `random.choice`; with the process's global random state
    (shared with a worker's other games) this game's episode took 26 steps after
    random.seed(1) and 18 after random.seed(2)."""
    game = next(g for g in ood_games
                if g.game_id == "look_at_obj_in_light-Book-None-DeskLamp-308/trial_T20190908_020029_636862")

    def play(global_seed: int) -> list[str]:
        random.seed(global_seed)
        env = AlfworldEnv(max_steps=50, with_expert=True)
        obs, commands = env.reset(game), []
        while not obs.done:
            commands.append(env.expert_action())
            random.random()  # another game of the worker draws in between
            obs = env.step(commands[-1])
        env.close()
        assert obs.won
        return commands

    assert play(1) == play(2)
    # the global state is the expert's again after a step
    assert sys.modules["alfworld.agents.expert.handcoded_expert"].random is random


def test_unknown_split_is_a_clear_error(data_root):
    with pytest.raises(DataError, match="unknown split 'valid'"):
        list_games("valid", data_root)


def test_expert_wins_a_real_game(ood_games):
    env = AlfworldEnv(max_steps=50, with_expert=True)
    obs = env.reset(ood_games[0])
    assert env.task.startswith("examine the alarmclock")
    assert "go to desk 1" in obs.admissible_commands and "help" not in obs.admissible_commands
    steps = 0
    while not obs.done:
        command = env.expert_action()
        assert command in obs.admissible_commands or command == "look"
        obs = env.step(command)
        steps += 1
    assert obs.won and env.steps == steps < 50
    env.close()


def test_step_limit_and_invalid_commands(ood_games):
    env = AlfworldEnv(max_steps=3)
    env.reset(ood_games[1])
    with pytest.raises(RuntimeError, match="with_expert=True"):  # the expert is not running
        env.expert_action()
    first = env.step("fly to the moon")
    assert first.text == "Nothing happens." and not first.done
    assert not env.step("look").done
    last = env.step("inventory")
    assert last.done and not last.won  # the step limit ends the episode, unwon
    # reset switches games and restarts the count
    env.reset(ood_games[0])
    assert env.steps == 0 and not env.step("look").done
    env.close()


def test_playing_a_game_leaves_alfworld_data_unset(ood_games):
    """alfworld's import sets $ALFWORLD_DATA to its own default; data resolution must not see it.
    (In a fresh process: alfworld must not have been imported before.)"""
    import os
    import subprocess
    import sys

    code = ("import os, sys; from envs import AlfworldEnv, Game; env = AlfworldEnv(max_steps=2); "
            "env.reset(Game(*sys.argv[1:])); env.close(); print(os.environ.get('ALFWORLD_DATA'))")
    game = ood_games[0]
    env = {k: v for k, v in os.environ.items() if k != "ALFWORLD_DATA"}
    out = subprocess.run([sys.executable, "-c", code, game.game_id, str(game.path), game.task_type],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "None"


def small_archive(data_root, path, trials: int):
    """An archive in alfworld-download's layout with the first `trials` games of each split."""
    import tarfile

    with tarfile.open(path, "w:xz") as tar:
        for split in ("train", "valid_train", "valid_seen", "valid_unseen"):
            for traj in sorted((data_root / "json_2.1.1" / split).glob("*/*/traj_data.json"))[:trials]:
                trial = traj.parent
                tar.add(trial, arcname=f"alfworld-data/{trial.relative_to(data_root)}")
    return path


def test_the_unpacked_games_are_tied_to_their_archive(data_root, tmp_path, monkeypatch):
    from envs import resolve_data_root

    monkeypatch.setenv("AGENTPRM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    one = small_archive(data_root, tmp_path / "one.tar.xz", 1)
    root = resolve_data_root(str(one))
    assert len(list_games("train", root)) == 1 and resolve_data_root(str(one)) == root  # unpacked once
    two = small_archive(data_root, tmp_path / "one.tar.xz", 2)  # the archive changes in place
    changed = resolve_data_root(str(two))
    assert changed != root and len(list_games("train", changed)) == 2  # not the old folder
    (tmp_path / "bad.tar.xz").write_bytes(one.read_bytes()[:5000])  # cut short
    with pytest.raises(DataError, match="cannot be unpacked"):
        resolve_data_root(str(tmp_path / "bad.tar.xz"))
    assert not list((tmp_path / "cache").glob("*.partial*"))  # nothing half-unpacked is left


def test_set_up_downloads_the_games_when_there_are_none(data_root, tmp_path, monkeypatch):
    """Without $ALFWORLD_DATA and without the archive, set-up runs alfworld-download into the
    cache, and later runs find the games there. The downloader here is a stand-in that writes
    alfworld-download's layout (this machine cannot reach the internet)."""
    from envs import data

    monkeypatch.setenv("AGENTPRM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    games = small_archive(data_root, tmp_path / "games.tar.xz", 1)
    downloader = tmp_path / "alfworld-download"
    downloader.write_text('#!/bin/sh\n[ "$1" = --data-dir ] || exit 2\n'
                          f'mkdir -p "$2" && tar -xJf {games} -C "$2" --strip-components=1\n')
    downloader.chmod(0o755)
    monkeypatch.setattr(data, "alfworld_download_command", lambda: [str(downloader)])
    missing = str(tmp_path / "no-such-archive.tar.xz")
    with pytest.raises(DataError, match="run scripts/setup.sh on a connected machine"):
        data.resolve_data_root(missing)
    root = data.prepare(missing)
    assert root == data.downloaded_root() and len(list_games("train", root)) == 1
    assert data.resolve_data_root(missing) == root  # later runs find them, without downloading
    downloader.write_text("#!/bin/sh\nexit 1\n")  # a download that fails
    shutil.rmtree(root)
    with pytest.raises(DataError, match="alfworld-download failed"):
        data.prepare(missing)
    assert not (root / "json_2.1.1").exists()
