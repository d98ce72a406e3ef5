-- Administration: vocabulary, families, denials, workflows, projects, lanes.

-- name: denial_delete
-- Lifts an ordinary denial, with a trail entry ($3 sub, $4 actor family) when it was still in force; one an admin
-- made only if $5 (the caller holds seat:admin). A governance-made one (reflexive or permanent) stays: its lift
-- goes through /v1/governance/lifts. Answers the denial's governance kind, whether an admin made it and whether it
-- was lifted, or no row when none is in force (an expired one, of any kind, is lifted already: a retried DELETE is
-- not refused).
WITH d AS (SELECT governance, by_admin FROM denials WHERE family_key = $1 AND feature = $2
                                                      AND (expires_at IS NULL OR expires_at > now())),
     gone AS (DELETE FROM denials WHERE family_key = $1 AND feature = $2 AND governance IS NULL
                                    AND ($5 OR NOT by_admin OR (expires_at IS NOT NULL AND expires_at <= now()))
              RETURNING reason, expires_at),
     t AS (INSERT INTO governance_trail (actor, actor_family, action, family_key, feature, reason, data)
           SELECT $3, $4, 'lift', $1, $2, 'removed with DELETE /v1/families/' || $1 || '/denials/' || $2,
                  jsonb_build_object('was', 'denial', 'expires_at', g.expires_at, 'denied_for', g.reason)
             FROM gone g WHERE g.expires_at IS NULL OR g.expires_at > now())
SELECT coalesce((SELECT governance FROM d), '') AS governance, (SELECT by_admin FROM d) AS by_admin,
       (SELECT count(*) FROM gone) AS lifted
 WHERE EXISTS (SELECT 1 FROM d);

-- name: denial_insert
-- A denial that has already expired is replaced (an expired governance ban included: the new row is the
-- admin's, not the governance's); an active one is a conflict (no row returned). On the governance trail as
-- `deny` ($6 the actor's family); $7 whether the caller holds seat:admin (only seat:admin lifts it then).
WITH d AS (
    INSERT INTO denials (family_key, feature, reason, expires_at, created_by, by_admin)
    VALUES ($1, $2, $3, $4, $5, $7)
    ON CONFLICT ON CONSTRAINT denials_pkey DO UPDATE
       SET reason = EXCLUDED.reason, expires_at = EXCLUDED.expires_at, created_by = EXCLUDED.created_by,
           created_at = now(), governance = NULL, by_admin = EXCLUDED.by_admin
     WHERE denials.expires_at IS NOT NULL AND denials.expires_at <= now()
    RETURNING feature, reason, expires_at, created_by, created_at
), t AS (
    INSERT INTO governance_trail (actor, actor_family, action, family_key, feature, reason, data)
    SELECT $5, $6, 'deny', $1, d.feature, d.reason, jsonb_build_object('expires_at', d.expires_at) FROM d
)
SELECT * FROM d;

-- name: denial_kind
-- A family's denial of a feature in force, if it has one: its governance kind ('' for one made through the denials
-- route) and whether an admin made it (only seat:admin lifts it then).
SELECT coalesce(governance, '') AS governance, by_admin FROM denials
 WHERE family_key = $1 AND feature = $2 AND (expires_at IS NULL OR expires_at > now());

-- name: denial_get
SELECT feature, reason, expires_at, created_by, created_at,
       (expires_at IS NULL OR expires_at > now()) AS active
  FROM denials WHERE family_key = $1 AND feature = $2;

-- name: denials_of_family
SELECT feature, reason, expires_at, created_by, created_at,
       (expires_at IS NULL OR expires_at > now()) AS active
  FROM denials WHERE family_key = $1 ORDER BY feature;

-- name: families_list
SELECT key FROM families WHERE key > $1 ORDER BY key LIMIT $2;

-- name: family_features_add
INSERT INTO family_features (family_key, feature) SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING;

-- name: family_features_clear
DELETE FROM family_features WHERE family_key = $1;

-- name: family_get
SELECT f.key, f.description, f.max_active, f.disabled, f.created_at, f.updated_at,
       coalesce(array(SELECT ff.feature FROM family_features ff WHERE ff.family_key = f.key
                      ORDER BY ff.feature), '{}') AS features
  FROM families f WHERE f.key = $1;

-- name: family_insert
INSERT INTO families (key, description, max_active) VALUES ($1, $2, $3);

-- name: family_lock
-- The family's row, locked, with whether it is disabled and whether an admin disabled it.
SELECT key, disabled, disabled_by_admin FROM families WHERE key = $1 FOR UPDATE;

-- name: family_update
-- $5: whether the caller holds seat:admin (a disable records it; an enable clears it). An overseer's disable of a
-- family an admin disabled keeps the admin's mark: else disabling it again would clear the mark, and its enable
-- then undo the admin's decision (found by a review).
UPDATE families
   SET disabled = coalesce($2, disabled), max_active = coalesce($3, max_active),
       description = coalesce($4, description), updated_at = now(),
       disabled_by_admin = CASE WHEN $2 IS NULL THEN disabled_by_admin
                                ELSE $2 AND (coalesce($5, false) OR (disabled AND disabled_by_admin)) END
 WHERE key = $1;

-- name: trail_family_state
-- A family disabled or enabled ($3 'disable' | 'enable'), on the governance trail: $1 sub, $2 actor family, $4 the
-- family, $5 the reason, $6 whether an admin did it (an admin's disable only an admin lifts).
INSERT INTO governance_trail (actor, actor_family, action, family_key, reason, data)
VALUES ($1, $2, $3, $4, $5, jsonb_build_object('by_admin', $6::boolean));

-- name: feature_get
SELECT name, kind, description, created_at FROM features WHERE name = $1;

-- name: key_lock
-- Serialises the creates of one key in its every spelling of case ($1: the kind and the key, lower-cased), so
-- that two look-alikes cannot both be created; held until the transaction ends.
SELECT pg_advisory_xact_lock(hashtext('ainarres:key:' || $1));

-- name: feature_look_alike
-- Keys are ASCII (their formats): lower-cased in the C collation, as Python lower-cases the lock's key, whatever
-- the database's locale (a Turkish one lower-cases I to ı).
SELECT name FROM features WHERE lower(name COLLATE "C") = lower($1 COLLATE "C") AND name <> $1 ORDER BY name LIMIT 1;

-- name: family_look_alike
SELECT key FROM families WHERE lower(key COLLATE "C") = lower($1 COLLATE "C") AND key <> $1 ORDER BY key LIMIT 1;

-- name: lane_look_alike
SELECT key FROM lanes WHERE lower(key COLLATE "C") = lower($1 COLLATE "C") AND key <> $1 ORDER BY key LIMIT 1;

-- name: feature_insert
INSERT INTO features (name, description) VALUES ($1, $2) RETURNING name, kind, description, created_at;

-- name: feature_ensure
INSERT INTO features (name, description) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING;

-- name: features_list
SELECT name, kind, description, created_at FROM features
 WHERE name > $1 AND ($2::text IS NULL OR kind = $2)
 ORDER BY name LIMIT $3;

-- name: guard_check
-- Parses a guard and runs it once against an empty task, so a guard that is not a predicate
-- (a path, not a boolean) is refused when the workflow is written, not when a task moves.
SELECT jsonb_path_match('{"payload": {}}'::jsonb, $1::jsonpath, '{}', false);

-- name: lane_get
SELECT l.id, l.key, p.slug AS project, w.key AS workflow, w.version AS workflow_version, l.context,
       l.created_at
  FROM lanes l JOIN projects p ON p.id = l.project_id JOIN workflows w ON w.id = l.workflow_id
 WHERE l.key = $1;

-- name: lane_insert
INSERT INTO lanes (project_id, key, workflow_id, context) VALUES ($1, $2, $3, $4::jsonb) RETURNING id;

-- name: lanes_list
SELECT l.key FROM lanes l JOIN projects p ON p.id = l.project_id
 WHERE l.key > $1 AND ($2::text IS NULL OR p.slug = $2)
 ORDER BY l.key LIMIT $3;

-- name: project_get
SELECT id, slug, context, created_at FROM projects WHERE slug = $1;

-- name: project_insert
INSERT INTO projects (slug, context) VALUES ($1, $2::jsonb) RETURNING id, slug, context, created_at;

-- name: projects_list
SELECT id, slug, context, created_at FROM projects WHERE slug > $1 ORDER BY slug LIMIT $2;

-- name: stage_insert
INSERT INTO stages (workflow_id, key, position, initial, terminal, lease_seconds, max_attempts,
                    escalate_after, max_rework, instructions)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
RETURNING id;

-- name: stages_of_workflow
SELECT key, initial, terminal, lease_seconds, max_attempts, escalate_after, max_rework, instructions
  FROM stages WHERE workflow_id = $1 ORDER BY position;

-- name: transition_insert
INSERT INTO transitions (workflow_id, position, from_stage, to_stage, kind, required_features, guard,
                         instructions)
VALUES ($1, $2, $3, $4, $5, $6::text[], $7::jsonpath, $8);

-- name: transitions_of_workflow
SELECT fs.key AS "from", ts.key AS "to", tr.kind, tr.required_features, tr.guard::text AS guard,
       tr.instructions
  FROM transitions tr
  JOIN stages fs ON fs.id = tr.from_stage
  JOIN stages ts ON ts.id = tr.to_stage
 WHERE tr.workflow_id = $1 ORDER BY tr.position;

-- name: workflow_get
-- The latest version unless one is named.
SELECT id, key, version, description, max_rework, created_at FROM workflows
 WHERE key = $1 AND ($2::int IS NULL OR version = $2)
 ORDER BY version DESC LIMIT 1;

-- name: workflow_insert
-- The next version of the key; run after workflow_lock, as its own statement, so its snapshot
-- sees the version a concurrent writer of the same key committed while we waited.
INSERT INTO workflows (key, version, description, max_rework)
SELECT $1, coalesce((SELECT max(version) FROM workflows WHERE key = $1), 0) + 1, $2, $3
RETURNING id, version;

-- name: workflow_lock
SELECT pg_advisory_xact_lock(hashtext('workflow:' || $1));

-- name: workflows_list
SELECT DISTINCT ON (key) key, version FROM workflows WHERE key > $1 ORDER BY key, version DESC LIMIT $2;

-- name: family_seats
-- The seat:* features a family is provisioned with (ADR 0008: governing such a family is for admins).
SELECT coalesce(array_agg(feature ORDER BY feature), '{}') FROM family_features
 WHERE family_key = $1 AND feature LIKE 'seat:%';

-- name: admins_lock
-- Serialises every change that may take seat:admin from a family (a denial or ban of it, a disable, features
-- without it): each checks that another admin family remains, and two such checks made at once would each see
-- the other's family still an admin and both go through (write skew: found by a review, which locked every admin
-- out with two denials sent together). Taken first in the transaction, before any family's row, so that it is
-- always taken in the same order.
SELECT pg_advisory_xact_lock(hashtextextended('ainarres.admins', 0));

-- name: family_holds_admin
-- Whether a family is provisioned with seat:admin and is enabled.
SELECT EXISTS (SELECT 1 FROM family_features ff JOIN families f ON f.key = ff.family_key
                WHERE ff.family_key = $1 AND ff.feature = 'seat:admin' AND NOT f.disabled);

-- name: other_admin_families
-- Enabled families other than $1 that hold seat:admin with no active denial of it.
SELECT count(*) FROM family_features ff JOIN families f ON f.key = ff.family_key
 WHERE ff.feature = 'seat:admin' AND ff.family_key <> $1 AND NOT f.disabled
   AND NOT EXISTS (SELECT 1 FROM denials d
                    WHERE d.family_key = ff.family_key AND d.feature = 'seat:admin'
                      AND (d.expires_at IS NULL OR d.expires_at > now()));
