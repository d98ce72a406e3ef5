-- 0014: a placeholder in branch h-scale only, so that 0015 applies without a gap. The real 0014 comes
-- from another branch: delete this file when merging.
SELECT 1;
