-- CreateApiClient under an idempotency key: the key (with its caller's scope, runtime.idempotency)
-- and a digest of the request it named, so a retry answers the client it made (never its secret
-- again: only its hash is kept) and the same key with another request is refused. NULL for
-- clients made without a key.
ALTER TABLE api_clients ADD COLUMN idempotency_key TEXT UNIQUE;
ALTER TABLE api_clients ADD COLUMN request_fingerprint BYTEA;
