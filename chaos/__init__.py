"""``make chaos``: a seeded lunch rush on the real services under scheduled faults, and an audit
of the money at the end (docs/chaos.md)."""
