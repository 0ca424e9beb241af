-- LookupMember by a face terminal's enrolment reference: an index of the members that have one.
-- (Card lookups use cards_one_active_per_uid and card_blacklist's key.)
CREATE INDEX members_by_face_ref ON members (tenant_id, face_enrolment_ref) WHERE face_enrolment_ref <> '';
