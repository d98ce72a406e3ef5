-- 0023: the caller's live state and its verdict, one function (ADR 0027). principal_of now takes what the
-- verified token names (jti, sub, family), always answers one row, and says in `refused` why the caller is
-- refused ('unknown', 'revoked', 'expired', 'disabled', 'other_family'; NULL: it is not). The service reads it
-- alone before a route's work (services.auth.authenticate) or inside the statement of a verb that moves a task
-- (the claim, the transition), which then changes nothing for a refused caller: one round trip, not two, and
-- the rule of who is refused written once, here.
--
-- The one-argument principal_of(uuid) of migration 0009 stays, unused by this build, so that processes of the
-- previous build still serving during a rolling upgrade keep working (docs/operations.md); a later migration
-- drops it.

CREATE FUNCTION principal_of(p_jti uuid, p_sub text, p_family text)
RETURNS TABLE (refused text, sub text, family_key text, scope text[], max_active integer, agent_family text,
               seen_stale boolean, features text[])
LANGUAGE sql STABLE AS $$
SELECT CASE
           WHEN t.jti IS NULL OR t.sub <> p_sub OR t.family_key <> p_family THEN 'unknown'
           WHEN t.revoked_at IS NOT NULL THEN 'revoked'
           WHEN t.expires_at <= now() THEN 'expired'
           WHEN f.disabled THEN 'disabled'
           WHEN a.family_key IS NOT NULL AND a.family_key <> t.family_key THEN 'other_family'
       END,
       t.sub, t.family_key, t.scope, f.max_active, a.family_key,
       -- last_seen_at is written at most every 30 s per agent, so calls do not each pay a write.
       coalesce(a.last_seen_at < now() - interval '30 seconds', false),
       coalesce(array(
           SELECT ff.feature FROM family_features ff
            WHERE ff.family_key = t.family_key
              AND (t.scope IS NULL OR ff.feature = ANY (t.scope))
              AND NOT EXISTS (
                  SELECT 1 FROM denials d
                   WHERE d.family_key = ff.family_key AND d.feature = ff.feature
                     AND (d.expires_at IS NULL OR d.expires_at > now()))
            ORDER BY ff.feature), '{}')
  FROM (SELECT 1) one
  LEFT JOIN tokens t ON t.jti = p_jti
  LEFT JOIN families f ON f.key = t.family_key
  LEFT JOIN agents a ON a.sub = t.sub
$$;
