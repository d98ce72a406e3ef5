-- 0020: a `ready` event when a task waiting on others becomes claimable (its last prerequisite finished), so
-- that a task's history says when and why it could be taken; until now the promotion left no trace.
-- The old CHECK is replaced NOT VALID: every existing row satisfies the narrower old one, so scanning the
-- events table to prove it (long, under a lock, on a large board) would prove nothing new.
ALTER TABLE events DROP CONSTRAINT events_type_valid;
ALTER TABLE events ADD CONSTRAINT events_type_valid CHECK (type = ANY (ARRAY[
    'created', 'claimed', 'progress', 'transition', 'released', 'blocked', 'unblocked', 'escalated', 'ready'
])) NOT VALID;
