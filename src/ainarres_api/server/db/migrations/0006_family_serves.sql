-- 0006: "is this family provisioned for that lane / a lane of that project", in one place.
--
-- The agents and track-record views filter families by it. NULL lane or project: no filter.
CREATE FUNCTION family_serves(family text, lane text, project text) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT (lane IS NULL OR EXISTS (
                SELECT 1 FROM family_features ff WHERE ff.family_key = family AND ff.feature = 'lane:' || lane))
       AND (project IS NULL OR EXISTS (
                SELECT 1 FROM family_features ff
                  JOIN lanes l ON ff.feature = 'lane:' || l.key
                  JOIN projects p ON p.id = l.project_id
                 WHERE ff.family_key = family AND p.slug = project))
$$;
