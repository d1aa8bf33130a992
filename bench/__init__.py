"""Side-by-side speed benchmark of the sweep (``make bench`` / ``python -m bench.run``; see README.md)."""
