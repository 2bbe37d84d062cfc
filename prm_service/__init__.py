"""PRM service: Ray actors that score (state, action) pairs in batches: issue 5."""
