-- A partner's bank clearing account has a credit limit: the floor its balance may not go below.
-- A top-up debits the clearing account, so its balance is minus what the bank has topped up (less
-- what it has paid in); the limit is how far the tenant lets that go. A new clearing account
-- starts at 0: the bank tops up what it prefunded, nothing more.
--
-- The floor is checked on the whole balance in the top-up's transaction, so a clearing account
-- keeps its balance in its own row (never sharded): existing ones fold their shards in here.
ALTER TABLE accounts ADD COLUMN credit_limit_fen BIGINT CHECK (credit_limit_fen >= 0);

UPDATE accounts a SET posted_fen = a.posted_fen + s.total
  FROM (SELECT account_id, sum(posted_fen)::bigint AS total FROM account_shards GROUP BY account_id) s
 WHERE a.account_id = s.account_id AND a.purse_kind = 'bank_clearing';
DELETE FROM account_shards s USING accounts a WHERE a.account_id = s.account_id AND a.purse_kind = 'bank_clearing';
-- What a bank already owes stays allowed, nothing more: raise the limit to let it top up again.
UPDATE accounts SET sharded = false, no_overdraft = false,
       credit_limit_fen = GREATEST(0, pending_fen - posted_fen)
 WHERE purse_kind = 'bank_clearing';

ALTER TABLE accounts
  ADD CONSTRAINT accounts_credit_limit_on_clearing_only
      CHECK ((purse_kind = 'bank_clearing') = (credit_limit_fen IS NOT NULL)),
  -- The last line of defence, as no_overdraft's CHECK is for purses: whatever the code does, the
  -- row refuses a balance below its floor.
  ADD CONSTRAINT accounts_within_credit_limit
      CHECK (credit_limit_fen IS NULL OR (NOT sharded AND posted_fen - pending_fen >= -credit_limit_fen));
