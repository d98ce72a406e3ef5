-- 0024: disabling and re-enabling a family (POST /v1/families/{key}/disable|enable, PATCH `disabled`) go on the
-- governance trail as `disable` and `enable`, with the reason given or a note that none was: a disable is a ban of
-- everything the family does, and it left no record (found by a review of SPEC §8 against the code).
-- NOT VALID, as in 0021: every existing row satisfies the narrower old CHECK.
ALTER TABLE governance_trail DROP CONSTRAINT governance_trail_action_valid;
ALTER TABLE governance_trail ADD CONSTRAINT governance_trail_action_valid CHECK (action = ANY (ARRAY[
    'reflexive_ban', 'recommend', 'permanent_ban', 'lift', 'unblock', 'flag', 'dismiss_flag',
    'accept_recommendation', 'dismiss_recommendation', 'policy', 'deny', 'disable', 'enable'
])) NOT VALID;
