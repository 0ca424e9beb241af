"""Webhooks: partners' endpoints and signed deliveries of the mesh's events (docs/webhooks.md)."""
