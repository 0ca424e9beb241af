-- The e-code (credential and counter) a payment, hold or offline record presented. A code pays at
-- most once per tenant: the unique index is what makes a code replayed at a second device book
-- once, whatever the interleaving of the two uploads.
ALTER TABLE transfers ADD COLUMN code_credential_id TEXT NOT NULL DEFAULT '';
ALTER TABLE transfers ADD COLUMN code_counter BIGINT;
ALTER TABLE transfers ADD CONSTRAINT transfers_code_complete
    CHECK ((code_credential_id = '') = (code_counter IS NULL));
CREATE UNIQUE INDEX transfers_by_code ON transfers (tenant_id, code_credential_id, code_counter)
    WHERE code_credential_id <> '';
