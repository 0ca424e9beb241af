-- GetMemberStatesAt (offline settlement): a member's newest feed entry at or before an instant,
-- and the card bindings of a UID in time order.
CREATE INDEX directory_changes_by_member ON directory_changes (tenant_id, member_id, changed_at, sequence);
CREATE INDEX cards_by_uid ON cards (tenant_id, card_uid, bound_at);
