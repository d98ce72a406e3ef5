-- 0004: an escalation belongs to the stage where the work failed.
--
-- Escalation rewrites a task's tier requirement (tier:N → tier:N+1). Without remembering what the
-- task required before, the raised tier followed the task into every later stage, where the next
-- role (a reviewer without the tier) could never claim it. base_required_features keeps the
-- requirement as created (NULL: not escalated in the current stage); a transition restores it.
ALTER TABLE tasks ADD COLUMN base_required_features text[];
