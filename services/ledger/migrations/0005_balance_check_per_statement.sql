-- The zero-sum check, once per INSERT statement instead of once per posting row at commit: the
-- ledger inserts all postings of a transfer (or of a whole batch of transfers) in one statement,
-- so after each statement every transfer it touched must sum to zero over all its postings. A
-- transfer whose legs were split across statements is refused at the first, which is stricter.
DROP TRIGGER postings_balanced ON postings;
DROP FUNCTION check_transfer_balanced();

CREATE FUNCTION check_postings_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad UUID;
    total BIGINT;
BEGIN
    -- Per touched transfer, the sum over all its postings (an index lookup each, whatever the
    -- size of the table).
    SELECT t.transfer_id, t.total INTO bad, total
      FROM (SELECT n.transfer_id,
                   (SELECT sum(p.amount_fen) FROM postings p WHERE p.transfer_id = n.transfer_id) AS total
              FROM (SELECT DISTINCT transfer_id FROM new_postings) n) t
     WHERE t.total <> 0
     LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'transfer % is unbalanced: its postings sum to % fen', bad, total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER postings_balanced AFTER INSERT ON postings
    REFERENCING NEW TABLE AS new_postings FOR EACH STATEMENT EXECUTE FUNCTION check_postings_balanced();
