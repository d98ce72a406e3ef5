-- 0017: the track record's counters (track_counts) are folded from `events` on read, by flow_fold beside
-- the flow rollups, instead of by the transition statement in every move (ADR 0019: the credit cost the raw
-- claim+advance cycle ~15 %). track_counts keeps its shape and its readers.
--
-- The counts already in track_counts were credited live, by the transition statement, for every move up to
-- now, while the fold's own mark (flow_fold.folded_to) may lag behind. The fold credits only events after
-- `credit_from`: the newest event when this migration ran. The statements that credited live are waited for
-- first (they write track_counts: the LOCK waits for every such transaction in flight and holds back new
-- ones), so each event they credited is committed, visible below and at or under the mark.
LOCK TABLE track_counts IN SHARE ROW EXCLUSIVE MODE;

ALTER TABLE flow_fold ADD COLUMN credit_from bigint NOT NULL DEFAULT 0;

UPDATE flow_fold SET credit_from = coalesce((SELECT max(e.id) FROM events e), 0) WHERE id = 1;
