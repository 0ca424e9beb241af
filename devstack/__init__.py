"""Local stack: embedded PostgreSQL and NATS, the service processes, the demo seed (`make run`)."""
