-- 0009: authentication folded into the one-round-trip claim and advance/reject (ADR 0010).
--
-- Every call reads the caller's features from the database (resolve_principal). For the claim and
-- the advance/reject that read was a round trip of its own; these functions make it the first
-- statement of the same call. Whatever is not in order — unknown, revoked or expired token, a
-- token whose sub or family disagrees with the row, a disabled family, an agent not yet recorded or
-- due a last_seen_at touch — returns NULLs having changed nothing, and the service authenticates
-- statement by statement (which words the refusal, records the agent) and goes on from there.

-- The caller behind a token id, read now: the family's features narrowed by the token's scope,
-- minus the family's active denials. One definition for resolve_principal (db/sql/auth.sql) and the
-- functions below; a single-SELECT SQL function, so PostgreSQL inlines it into the caller's plan.
CREATE FUNCTION principal_of(p_jti uuid)
RETURNS TABLE (sub text, family_key text, scope text[], revoked_at timestamptz, expired boolean,
               disabled boolean, max_active int, agent_family text, seen_stale boolean, features text[])
LANGUAGE sql STABLE AS $$
SELECT t.sub, t.family_key, t.scope, t.revoked_at, t.expires_at <= now(),
       f.disabled, f.max_active,
       (SELECT a.family_key FROM agents a WHERE a.sub = t.sub),
       -- last_seen_at is written at most every 30 s per agent, so calls do not each pay a write.
       coalesce((SELECT a.last_seen_at < now() - interval '30 seconds' FROM agents a WHERE a.sub = t.sub),
                false),
       coalesce(array(
           SELECT ff.feature FROM family_features ff
            WHERE ff.family_key = t.family_key
              AND (t.scope IS NULL OR ff.feature = ANY (t.scope))
              AND NOT EXISTS (
                  SELECT 1 FROM denials d
                   WHERE d.family_key = ff.family_key AND d.feature = ff.feature
                     AND (d.expires_at IS NULL OR d.expires_at > now()))
            ORDER BY ff.feature), '{}')
  FROM tokens t
  JOIN families f ON f.key = t.family_key
 WHERE t.jti = p_jti
$$;

-- The caller's features and max_active if the token (already verified by the service: signature,
-- issuer, audience, exp) is in order in the database and its agent needs no write; else NULLs.
CREATE FUNCTION caller_in_order(p_jti uuid, p_sub text, p_family text, OUT features text[], OUT max_active int)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    a record;
BEGIN
    SELECT * INTO a FROM principal_of(p_jti);
    IF FOUND AND a.sub = p_sub AND a.family_key = p_family AND a.revoked_at IS NULL AND NOT a.expired
       AND NOT a.disabled AND a.agent_family = a.family_key AND NOT a.seen_stale THEN
        features := a.features;
        max_active := a.max_active;
    END IF;
END
$$;

CREATE FUNCTION claim_by_token(p_jti uuid, p_sub text, p_family text, p_lane text, p_max_routes int,
                               OUT code text, OUT task jsonb, OUT event jsonb, OUT lease_id uuid,
                               OUT lease_expires_at timestamptz, OUT stage_id uuid)
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    c record;
BEGIN
    SELECT * INTO c FROM caller_in_order(p_jti, p_sub, p_family);
    IF c.features IS NULL THEN
        RETURN;
    END IF;
    SELECT f.code, f.task, f.event, f.lease_id, f.lease_expires_at, f.stage_id
      INTO code, task, event, lease_id, lease_expires_at, stage_id
      FROM claim_fast(p_sub, p_family, c.features, p_lane, c.max_active, p_max_routes) f;
END
$$;

-- p_seats: the seats that see every lane (services/auth.py SEATS), so the rule has one definition.
CREATE FUNCTION transition_by_token(p_jti uuid, p_sub text, p_family text, p_seats text[], p_task uuid,
                                    p_lease uuid, p_kind text, p_to text, p_text text, p_artifacts jsonb,
                                    OUT task jsonb, OUT event jsonb, OUT route_id int, OUT promoted int[])
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    c record;
BEGIN
    SELECT * INTO c FROM caller_in_order(p_jti, p_sub, p_family);
    IF c.features IS NULL THEN
        RETURN;
    END IF;
    SELECT f.task, f.event, f.route_id, f.promoted INTO task, event, route_id, promoted
      FROM transition_fast(p_task, p_lease, p_kind, p_to, p_text, p_artifacts, p_sub, p_family, c.features,
                           c.features && p_seats) f;
END
$$;
