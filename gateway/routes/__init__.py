"""The HTTP routes, one module per area: oauth (tokens), identity (tenants, members, media,
imports, directory feed, API clients), ops (health and metrics)."""
