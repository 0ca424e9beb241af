-- Every grant carries a version, new whenever the grant is made or its scopes change. The gateway
-- writes it into the tokens it issues and refuses a token whose grant now has another version or
-- is gone: revoking or changing a grant ends the tokens issued under it.
CREATE SEQUENCE grant_versions;
ALTER TABLE tenant_grants ADD COLUMN grant_version BIGINT NOT NULL DEFAULT nextval('grant_versions');

-- A revoked client (a leaked secret): every grant gone, its secret no longer authenticates, and
-- no tenant can grant it again.
ALTER TABLE api_clients ADD COLUMN revoked_at TIMESTAMPTZ;
