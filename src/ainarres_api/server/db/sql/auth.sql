-- Identity: tokens, families, agents.

-- name: agent_ensure
-- Agents are created on first use; a sub never changes family.
INSERT INTO agents (sub, family_key) VALUES ($1, $2) ON CONFLICT (sub) DO NOTHING;

-- name: agent_family
-- The family a sub belongs to, whether it has called yet or only holds a token.
SELECT family_key FROM agents WHERE sub = $1
UNION ALL
SELECT family_key FROM tokens WHERE sub = $1
LIMIT 1;

-- name: family_for_mint
SELECT f.key, f.disabled,
       coalesce(array(SELECT ff.feature FROM family_features ff WHERE ff.family_key = f.key), '{}') AS features
  FROM families f WHERE f.key = $1;

-- name: resolve_principal
-- Runs on every authenticated call but the claim and the transition, whose statements read it themselves
-- (services.auth.read; migration 0023): whether the caller is refused, and the family's provisioned
-- features, narrowed by the token's scope, minus the family's active denials, read now, so a revocation
-- bites on the next call. $1 the token's jti, $2 its sub, $3 its family.
SELECT * FROM principal_of($1, $2, $3);

-- name: token_insert
INSERT INTO tokens (jti, family_key, sub, scope, issued_at, expires_at, created_by)
VALUES ($1, $2, $3, $4, $5, $6, $7);

-- name: token_revoke
UPDATE tokens SET revoked_at = coalesce(revoked_at, now()) WHERE jti = $1 RETURNING jti;

-- name: token_list
-- In jti order so that `after=<jti>` pages through them.
SELECT jti, family_key AS family, sub, scope, issued_at, expires_at, revoked_at
  FROM tokens
 WHERE ($1::text IS NULL OR family_key = $1) AND ($3::uuid IS NULL OR jti > $3)
 ORDER BY jti
 LIMIT $2;

-- name: token_get
SELECT jti, family_key AS family, sub, scope, issued_at, expires_at, revoked_at FROM tokens WHERE jti = $1;

-- name: agent_touch
UPDATE agents SET last_seen_at = now() WHERE sub = $1;

-- name: signing_key_hold
-- The key the database's tokens are signed with: $1 algorithm, $2 fingerprint recorded if none is yet (the first
-- start); answers the one recorded (the same, or another: the caller refuses to serve with it).
WITH ins AS (
    INSERT INTO signing_key (algorithm, fingerprint) VALUES ($1, $2) ON CONFLICT (one) DO NOTHING
    RETURNING algorithm, fingerprint, set_at
)
SELECT * FROM ins
UNION ALL
SELECT algorithm, fingerprint, set_at FROM signing_key WHERE NOT EXISTS (SELECT 1 FROM ins);

-- name: signing_key_rotate
-- A new key in force ($1 algorithm, $2 fingerprint): replicas with the old one are refused at their next start.
INSERT INTO signing_key (algorithm, fingerprint) VALUES ($1, $2)
    ON CONFLICT (one) DO UPDATE SET algorithm = EXCLUDED.algorithm, fingerprint = EXCLUDED.fingerprint, set_at = now();
