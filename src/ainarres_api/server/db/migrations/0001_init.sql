-- 0001: the substrate's schema.
--
-- Every constraint is named: the db layer translates asyncpg errors by constraint name.
-- Ids of things people type (features, families, lanes) are their keys; ids of things the
-- system makes (tasks, leases, tokens) are uuids; events are a bigint sequence so that a
-- stream can resume from "the last id I saw".

-- Vocabulary --------------------------------------------------------------------------------------

CREATE TABLE features (
    name        text        NOT NULL,
    kind        text        NOT NULL GENERATED ALWAYS AS (split_part(name, ':', 1)) STORED,
    description text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT features_pkey PRIMARY KEY (name),
    CONSTRAINT features_name_format CHECK (name ~ '^[a-z][a-z0-9_-]{0,31}:[A-Za-z0-9][A-Za-z0-9_.+-]{0,95}$')
);

-- Identity ----------------------------------------------------------------------------------------

CREATE TABLE families (
    key         text        NOT NULL,
    description text        NOT NULL DEFAULT '',
    max_active  integer     NOT NULL DEFAULT 1,
    disabled    boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT families_pkey PRIMARY KEY (key),
    CONSTRAINT families_key_format CHECK (key ~ '^[A-Za-z0-9][A-Za-z0-9_.+@-]{0,99}$'),
    CONSTRAINT families_max_active_positive CHECK (max_active BETWEEN 1 AND 1000)
);

CREATE TABLE family_features (
    family_key text NOT NULL,
    feature    text NOT NULL,
    CONSTRAINT family_features_pkey PRIMARY KEY (family_key, feature),
    CONSTRAINT family_features_family_fkey FOREIGN KEY (family_key) REFERENCES families (key) ON DELETE CASCADE,
    CONSTRAINT family_features_feature_fkey FOREIGN KEY (feature) REFERENCES features (name)
);

-- A denial vetoes a feature for a whole family, now or until expires_at.
CREATE TABLE denials (
    family_key text        NOT NULL,
    feature    text        NOT NULL,
    reason     text        NOT NULL,
    expires_at timestamptz,
    created_by text,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT denials_pkey PRIMARY KEY (family_key, feature),
    CONSTRAINT denials_family_fkey FOREIGN KEY (family_key) REFERENCES families (key) ON DELETE CASCADE,
    CONSTRAINT denials_feature_fkey FOREIGN KEY (feature) REFERENCES features (name),
    CONSTRAINT denials_reason_present CHECK (length(reason) BETWEEN 1 AND 2000)
);

-- An agent is one running instance of a family: a token's sub. Created on first use.
CREATE TABLE agents (
    sub           text        NOT NULL,
    family_key    text        NOT NULL,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT agents_pkey PRIMARY KEY (sub),
    CONSTRAINT agents_family_fkey FOREIGN KEY (family_key) REFERENCES families (key) ON DELETE CASCADE,
    CONSTRAINT agents_sub_format CHECK (sub ~ '^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}$')
);
CREATE INDEX agents_by_family ON agents (family_key);

-- Every token the service signs is recorded: a token whose jti is not here is refused,
-- so the database, not the signing key alone, decides who may call.
CREATE TABLE tokens (
    jti        uuid        NOT NULL,
    family_key text        NOT NULL,
    sub        text        NOT NULL,
    scope      text[],
    issued_at  timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz,
    created_by text,
    CONSTRAINT tokens_pkey PRIMARY KEY (jti),
    CONSTRAINT tokens_family_fkey FOREIGN KEY (family_key) REFERENCES families (key) ON DELETE CASCADE
);
CREATE INDEX tokens_by_family ON tokens (family_key);

-- Work --------------------------------------------------------------------------------------------

CREATE TABLE projects (
    id         uuid        NOT NULL DEFAULT gen_random_uuid(),
    slug       text        NOT NULL,
    context    jsonb       NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT projects_pkey PRIMARY KEY (id),
    CONSTRAINT projects_slug_key UNIQUE (slug),
    CONSTRAINT projects_slug_format CHECK (slug ~ '^[a-z0-9][a-z0-9_-]{0,63}$')
);

-- A workflow version is immutable once written: lanes and tasks refer to its stages.
CREATE TABLE workflows (
    id          uuid        NOT NULL DEFAULT gen_random_uuid(),
    key         text        NOT NULL,
    version     integer     NOT NULL,
    description text        NOT NULL DEFAULT '',
    max_rework  integer,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT workflows_pkey PRIMARY KEY (id),
    CONSTRAINT workflows_key_version_key UNIQUE (key, version),
    CONSTRAINT workflows_key_format CHECK (key ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    CONSTRAINT workflows_max_rework_positive CHECK (max_rework IS NULL OR max_rework >= 0)
);

CREATE TABLE stages (
    id             uuid    NOT NULL DEFAULT gen_random_uuid(),
    workflow_id    uuid    NOT NULL,
    key            text    NOT NULL,
    position       integer NOT NULL,
    initial        boolean NOT NULL DEFAULT false,
    terminal       boolean NOT NULL DEFAULT false,
    lease_seconds  integer NOT NULL DEFAULT 300,
    max_attempts   integer NOT NULL DEFAULT 3,
    escalate_after integer,
    max_rework     integer,
    instructions   text    NOT NULL DEFAULT '',
    CONSTRAINT stages_pkey PRIMARY KEY (id),
    CONSTRAINT stages_workflow_fkey FOREIGN KEY (workflow_id) REFERENCES workflows (id),
    CONSTRAINT stages_workflow_key_key UNIQUE (workflow_id, key),
    CONSTRAINT stages_lease_seconds_range CHECK (lease_seconds BETWEEN 1 AND 86400),
    CONSTRAINT stages_max_attempts_positive CHECK (max_attempts >= 1),
    CONSTRAINT stages_escalate_after_positive CHECK (escalate_after IS NULL OR escalate_after >= 1),
    CONSTRAINT stages_max_rework_positive CHECK (max_rework IS NULL OR max_rework >= 0),
    CONSTRAINT stages_initial_not_terminal CHECK (NOT (initial AND terminal))
);
CREATE UNIQUE INDEX stages_one_initial ON stages (workflow_id) WHERE initial;

CREATE TABLE transitions (
    id                uuid     NOT NULL DEFAULT gen_random_uuid(),
    workflow_id       uuid     NOT NULL,
    position          integer  NOT NULL,
    from_stage        uuid     NOT NULL,
    to_stage          uuid     NOT NULL,
    kind              text     NOT NULL,
    required_features text[]   NOT NULL DEFAULT '{}',
    guard             jsonpath,
    CONSTRAINT transitions_pkey PRIMARY KEY (id),
    CONSTRAINT transitions_workflow_fkey FOREIGN KEY (workflow_id) REFERENCES workflows (id),
    CONSTRAINT transitions_from_fkey FOREIGN KEY (from_stage) REFERENCES stages (id),
    CONSTRAINT transitions_to_fkey FOREIGN KEY (to_stage) REFERENCES stages (id),
    CONSTRAINT transitions_kind_valid CHECK (kind IN ('advance', 'reject'))
);
CREATE INDEX transitions_by_from ON transitions (from_stage, kind);

-- Lane keys are unique across projects: `lane:<key>` is one feature, never ambiguous.
CREATE TABLE lanes (
    id          uuid        NOT NULL DEFAULT gen_random_uuid(),
    project_id  uuid        NOT NULL,
    key         text        NOT NULL,
    workflow_id uuid        NOT NULL,
    context     jsonb       NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT lanes_pkey PRIMARY KEY (id),
    CONSTRAINT lanes_key_key UNIQUE (key),
    CONSTRAINT lanes_project_fkey FOREIGN KEY (project_id) REFERENCES projects (id),
    CONSTRAINT lanes_workflow_fkey FOREIGN KEY (workflow_id) REFERENCES workflows (id),
    CONSTRAINT lanes_key_format CHECK (key ~ '^[A-Za-z0-9][A-Za-z0-9_.+-]{0,95}$')
);

-- Routing -----------------------------------------------------------------------------------------
--
-- A route is one (lane, stage, canonical required-feature set): every task sitting in the same
-- route needs exactly the same thing from a claimer. Its bundles are the alternative feature sets
-- that make a claimer eligible: lane:<lane> ∪ the task's required features ∪ the required
-- features of one transition out of the stage (one bundle per transition). Routes never change
-- once written (workflow versions are immutable), so a claimer's eligible routes can be found
-- from this small table alone and the tasks table is probed once per eligible route.
CREATE TABLE routes (
    id                integer GENERATED ALWAYS AS IDENTITY,
    lane_id           uuid    NOT NULL,
    stage_id          uuid    NOT NULL,
    required_features text[]  NOT NULL,
    CONSTRAINT routes_pkey PRIMARY KEY (id),
    CONSTRAINT routes_lane_fkey FOREIGN KEY (lane_id) REFERENCES lanes (id),
    CONSTRAINT routes_stage_fkey FOREIGN KEY (stage_id) REFERENCES stages (id),
    CONSTRAINT routes_identity_key UNIQUE (lane_id, stage_id, required_features)
);

CREATE TABLE route_bundles (
    route_id integer NOT NULL,
    features text[]  NOT NULL,
    CONSTRAINT route_bundles_pkey PRIMARY KEY (route_id, features),
    CONSTRAINT route_bundles_route_fkey FOREIGN KEY (route_id) REFERENCES routes (id)
);
CREATE INDEX route_bundles_features ON route_bundles USING gin (features);

-- Tasks -------------------------------------------------------------------------------------------
--
-- state is the routing state, one of:
--   waiting  a dependency has not reached a terminal stage yet
--   ready    claimable: in the ready index
--   held     someone holds a lease (it may have expired: lazy recovery finds it via tasks_lease)
--   blocked  parked for a human
--   done     in a terminal stage
-- Only `ready` rows are in the claim index, so in-flight, parked and finished work costs
-- the claim nothing.
CREATE TABLE tasks (
    id                uuid        NOT NULL DEFAULT gen_random_uuid(),
    lane_id           uuid        NOT NULL,
    stage_id          uuid        NOT NULL,
    route_id          integer,
    state             text        NOT NULL,
    title             text        NOT NULL,
    payload           jsonb       NOT NULL DEFAULT '{}',
    priority          integer     NOT NULL DEFAULT 0,
    required_features text[]      NOT NULL DEFAULT '{}',
    depends_on        uuid[]      NOT NULL DEFAULT '{}',
    attempts          integer     NOT NULL DEFAULT 0,
    rework_count      integer     NOT NULL DEFAULT 0,
    rework_by_stage   jsonb       NOT NULL DEFAULT '{}',
    blocked_reason    text,
    holder            text,
    lease_id          uuid,
    lease_expires_at  timestamptz,
    held_since        timestamptz,
    progress_at       timestamptz,
    idempotency_key   text,
    request_hash      text,
    created_by        text,
    available_at      timestamptz NOT NULL DEFAULT now(),
    stage_entered_at  timestamptz NOT NULL DEFAULT now(),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tasks_pkey PRIMARY KEY (id),
    CONSTRAINT tasks_lane_fkey FOREIGN KEY (lane_id) REFERENCES lanes (id),
    CONSTRAINT tasks_stage_fkey FOREIGN KEY (stage_id) REFERENCES stages (id),
    CONSTRAINT tasks_route_fkey FOREIGN KEY (route_id) REFERENCES routes (id),
    CONSTRAINT tasks_state_valid CHECK (state IN ('waiting', 'ready', 'held', 'blocked', 'done')),
    CONSTRAINT tasks_title_length CHECK (length(title) BETWEEN 1 AND 200),
    CONSTRAINT tasks_held_has_lease CHECK (
        (state = 'held') = (holder IS NOT NULL AND lease_id IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT tasks_blocked_has_reason CHECK ((state = 'blocked') = (blocked_reason IS NOT NULL)),
    CONSTRAINT tasks_ready_has_route CHECK (state NOT IN ('ready', 'held') OR route_id IS NOT NULL),
    CONSTRAINT tasks_counts_nonnegative CHECK (attempts >= 0 AND rework_count >= 0),
    CONSTRAINT tasks_priority_range CHECK (priority BETWEEN -1000000 AND 1000000)
);

-- The claim index: one range per route, best first. Only ready rows live here.
CREATE INDEX tasks_ready ON tasks (route_id, priority DESC, available_at, id) WHERE state = 'ready';
-- Lazy recovery: held rows by expiry; the claim probes it for leases that ran out.
CREATE INDEX tasks_lease ON tasks (lease_expires_at) WHERE state = 'held';
CREATE INDEX tasks_by_holder ON tasks (holder) WHERE state = 'held';
CREATE INDEX tasks_by_lane ON tasks (lane_id, created_at);
CREATE INDEX tasks_waiting_deps ON tasks USING gin (depends_on) WHERE state IN ('waiting', 'blocked');
CREATE UNIQUE INDEX tasks_idempotency ON tasks (lane_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- Events: append-only, enforced here, not by convention -------------------------------------------

CREATE TABLE events (
    id         bigint      GENERATED ALWAYS AS IDENTITY,
    task_id    uuid        NOT NULL,
    type       text        NOT NULL,
    actor      text,
    family     text,
    data       jsonb       NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_pkey PRIMARY KEY (id),
    CONSTRAINT events_task_fkey FOREIGN KEY (task_id) REFERENCES tasks (id),
    CONSTRAINT events_type_valid CHECK (type IN (
        'created', 'claimed', 'progress', 'transition', 'released', 'blocked', 'unblocked', 'escalated'))
);
CREATE INDEX events_by_task ON events (task_id, id);

CREATE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only: % refused', TG_OP
        USING ERRCODE = 'restrict_violation', CONSTRAINT = 'events_append_only';
END
$$;

CREATE TRIGGER events_no_update BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- Churn: the claim index sees one dead entry per claim. Vacuum the hot table far more often than
-- the 20 % default so dead entries at the head of each route do not pile up (claim-path.md §1).
ALTER TABLE tasks SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 10000,
    autovacuum_analyze_scale_factor = 0.02,
    fillfactor = 80
);

-- JSON shapes ---------------------------------------------------------------------------------------
-- The task and event as every caller reads them; one definition used by every verb's RETURNING.

CREATE FUNCTION task_json(t tasks) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', t.id,
        'project', p.slug,
        'lane', l.key,
        'stage', s.key,
        'state', t.state,
        'title', t.title,
        'payload', t.payload,
        'priority', t.priority,
        'required_features', to_jsonb(t.required_features),
        'depends_on', to_jsonb(t.depends_on),
        'attempts', t.attempts,
        'rework_count', t.rework_count,
        'blocked', t.state = 'blocked',
        'blocked_reason', t.blocked_reason,
        'holder', CASE WHEN t.state = 'held' THEN t.holder END,
        'lease_expires_at', CASE WHEN t.state = 'held' THEN t.lease_expires_at END,
        'created_at', t.created_at,
        'updated_at', t.updated_at)
    FROM lanes l
    JOIN projects p ON p.id = l.project_id
    JOIN stages s ON s.id = t.stage_id
    WHERE l.id = t.lane_id
$$;

CREATE FUNCTION event_json(e events) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object(
        'id', e.id, 'task_id', e.task_id, 'type', e.type, 'actor', e.actor,
        'family', e.family, 'data', e.data, 'created_at', e.created_at)
$$;
