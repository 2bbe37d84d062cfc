"""Two evaluations of the same games compared game by game, with an exact McNemar test.

    python -m reports.paired A/eval.json B/eval.json [--names pi0 pi1] [--out paired.json] [--plot paired.png]

Either may also be a folder of episode shards, such as an evaluation still running: it is
compared on the games it has finished.

Two success rates alone cannot say whether one policy beats another: on 134 games, 30% vs
35% is well within chance. On the same games the evidence is in the games one policy wins
and the other loses (the discordant games); if neither policy is better, each such game is
a fair coin, and the exact McNemar p-value is the two-sided binomial tail of that split.
"""
from __future__ import annotations

import argparse
import json
import sys
from math import comb
from pathlib import Path


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided p-value of `a_only` vs `b_only` discordant games under a fair coin."""
    n = a_only + b_only
    tail = sum(comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def won_games(report: dict, name: str) -> dict[str, bool]:
    """Game id -> won, from an evaluation report's `won_per_game` (one episode per game)."""
    if "won_per_game" not in report:
        raise ValueError(f"{name} has no won_per_game: evaluate it again with this version to add it")
    several = [g for g, (_, episodes) in report["won_per_game"].items() if episodes != 1]
    if several:
        raise ValueError(f"{name}: {len(several)} games have several episodes; a paired test wants one per game")
    return {game: won > 0 for game, (won, _) in report["won_per_game"].items()}


def paired(a: dict, b: dict, names: tuple[str, str] = ("a", "b")) -> dict:
    """Success of each on the games both played, the discordant counts, and McNemar's p."""
    won_a, won_b = won_games(a, names[0]), won_games(b, names[1])
    games = sorted(won_a.keys() & won_b.keys())
    if not games:
        raise ValueError(f"{names[0]} and {names[1]} share no game")
    a_only = sum(won_a[g] and not won_b[g] for g in games)
    b_only = sum(won_b[g] and not won_a[g] for g in games)
    success = [sum(won[g] for g in games) / len(games) for won in (won_a, won_b)]
    return {"games": len(games), "a": names[0], "b": names[1], "a_success": success[0], "b_success": success[1],
            "difference": success[1] - success[0], "a_only": a_only, "b_only": b_only,
            "p_value": mcnemar_exact(a_only, b_only)}


def load_evaluation(path: Path) -> dict:
    """An evaluation report (JSON), or the report of a folder of episode shards."""
    if path.is_dir():
        from rollout_workers.evaluation import summarize
        from rollout_workers.records import read_steps

        return summarize(read_steps(path))
    return json.loads(path.read_text())


def format_paired(result: dict) -> str:
    return (f"{result['games']} games: {result['a']} {result['a_success']:.1%}, {result['b']} {result['b_success']:.1%} "
            f"(difference {result['difference']:+.1%}); won by {result['a']} only {result['a_only']}, "
            f"by {result['b']} only {result['b_only']}; exact McNemar p = {result['p_value']:.3g}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="the first evaluation's report (eval.json) or folder of shards")
    parser.add_argument("b", type=Path, help="the second evaluation's, of the same games")
    parser.add_argument("--names", nargs=2, metavar=("A", "B"), help="what to call them (default: the paths)")
    parser.add_argument("--out", type=Path, help="also write the comparison here as JSON")
    parser.add_argument("--plot", type=Path, help="and draw it here as a PNG (both success rates, the p-value)")
    args = parser.parse_args()
    try:
        names = tuple(args.names or (str(args.a), str(args.b)))
        result = paired(load_evaluation(args.a), load_evaluation(args.b), names)
    except (OSError, ValueError) as error:  # a missing file, or reports that cannot be paired
        sys.exit(f"paired: {error}")
    print(format_paired(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    if args.plot:
        from reports.plots import plot_success

        a, b = result["a"], result["b"]
        plot_success({a: result["a_success"], b: result["b_success"]}, {b: result}, args.plot,
                     f"{result['games']} games played by both")
