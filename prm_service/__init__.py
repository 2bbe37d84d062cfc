"""PRM service: Ray actors that score (state, action) pairs with a process reward model.

    prm = start_prm_servers(cfg.prm_service, "runs/x/critic/prm")   # a PRMClient
    result = await prm.score(prompt, [response_1, response_2])         # ScoreResult(scores, prm_version)
    prm.load("runs/x/critic/prm-2", version=2)                         # a newer checkpoint, in place

`scorer.py` holds the scoring (a shared prompt, cached states; the model: models/prm.py);
`server.py` the actors, dynamic batching and the client.
"""
from prm_service.scorer import PRMScorer, ScoreRequest
from prm_service.server import PRMClient, PRMServer, ScoreResult, start_prm_servers

__all__ = ["PRMScorer", "ScoreRequest", "PRMClient", "PRMServer", "ScoreResult", "start_prm_servers"]
