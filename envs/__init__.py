"""ALFWorld: the games on disk (`list_games`, `pick_games`) and one playable game (`AlfworldEnv`)."""
from envs.alfworld import AlfworldEnv, Observation
from envs.data import SPLIT_DIRS, TASK_TYPES, DataError, Game, list_games, pick_games, resolve_data_root

__all__ = ["AlfworldEnv", "Observation", "Game", "DataError", "list_games", "pick_games", "resolve_data_root",
           "SPLIT_DIRS", "TASK_TYPES"]
