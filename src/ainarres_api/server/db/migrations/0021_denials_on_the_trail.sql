-- 0021: an admin's denial (POST /v1/families/{key}/denials) goes on the governance trail as `deny`, and its
-- removal (DELETE) as `lift`, as the overseer's acts do: a denial without an end is a permanent ban in all but
-- name, and one made and removed left no record (found by a review of SPEC §8 against the code).
-- NOT VALID, as in 0020: every existing row satisfies the narrower old CHECK.
ALTER TABLE governance_trail DROP CONSTRAINT governance_trail_action_valid;
ALTER TABLE governance_trail ADD CONSTRAINT governance_trail_action_valid CHECK (action = ANY (ARRAY[
    'reflexive_ban', 'recommend', 'permanent_ban', 'lift', 'unblock', 'flag', 'dismiss_flag',
    'accept_recommendation', 'dismiss_recommendation', 'policy', 'deny'
])) NOT VALID;
