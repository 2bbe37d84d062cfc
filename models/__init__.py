"""Models that both a learner and a service use, with no dependency on either: the PRM
(`prm.py`: the policy's backbone with a scalar head, Q at every turn of an episode)."""
