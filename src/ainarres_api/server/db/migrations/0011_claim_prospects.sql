-- 0011: what an agent needs to know about where its work lives and why a claim found nothing.
--
-- The project's and lane's context (where the work's truth lives: the repository, the rules) goes to
-- every agent of the lane with its claim and its cards: one definition of that document here.
CREATE FUNCTION lane_context(lane uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('project', jsonb_build_object('slug', p.slug, 'context', p.context),
                              'lane', jsonb_build_object('key', l.key, 'context', l.context))
      FROM lanes l JOIN projects p ON p.id = l.project_id
     WHERE l.id = lane
$$;

-- An empty claim says whether work exists that the agent may not take yet (held by others, waiting on
-- dependencies, blocked for a human): those are counted per route, through this index of the parked
-- rows only (ready rows are in tasks_ready, held ones in tasks_lease).
CREATE INDEX tasks_parked ON tasks (route_id, state) WHERE state IN ('waiting', 'blocked');
