-- 0013: a placeholder in branch h-spend only, so that 0014 applies without a gap. The real 0013
-- (governance) comes from branch h-gov: delete this file when merging.
SELECT 1;
