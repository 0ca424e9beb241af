"""onecard-admin: the operator's command line. It calls the services over mutual TLS with the
operator's certificate (spiffe://onecard/ops) and reads JetStream state with the operator's NATS
account, so it can do exactly what the allow-lists grant ``ops`` and nothing more."""
