"""What the policy server and the PRM service share, so neither reaches into the other:
dynamic batching (`batching.py`), the replicas of a service behind one handle, their restarts
and catch-up (`replicas.py`), and the device and dtype a served model gets (`devices.py`)."""
