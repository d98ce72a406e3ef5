-- 0022: a capability's policy keeps only recommend_after_flags. Strikes and their bans are counted per
-- (family, role) under the role's policy, so a `capability:` policy's strike and ban thresholds governed
-- nothing; the service now refuses them (ADR 0026). Any stored before are cleared here, on the trail.
WITH cleared AS (
    UPDATE governance_policies
       SET strike_threshold = NULL, ban_base_seconds = NULL, ban_cap_seconds = NULL, recommend_after_bans = NULL,
           updated_by = 'substrate', updated_at = now()
     WHERE scope = 'feature' AND key LIKE 'capability:%'
       AND num_nonnulls(strike_threshold, ban_base_seconds, ban_cap_seconds, recommend_after_bans) > 0
    RETURNING scope, key, recommend_after_flags
)
INSERT INTO governance_trail (actor, action, reason, data)
SELECT 'substrate', 'policy',
       format('policy %s/%s: its strike and ban thresholds cleared (migration 0022): they governed nothing, '
              'strikes being counted per role', scope, key),
       jsonb_build_object('scope', scope, 'key', key, 'recommend_after_flags', recommend_after_flags)
  FROM cleared;
