-- A tenant's code settings beside its caps (which 0001 already keeps in tenant_state): the
-- defaults an issue request may leave out. Tenants without a row, or with the column defaults,
-- have the service's defaults; settings_updated_at says whether the tenant ever chose.
ALTER TABLE tenant_state
    ADD COLUMN default_validity_hours INT NOT NULL DEFAULT 24 CHECK (default_validity_hours BETWEEN 1 AND 72),
    ADD COLUMN default_purposes       TEXT[] NOT NULL DEFAULT '{}',
    ADD COLUMN settings_updated_at    TIMESTAMPTZ;
