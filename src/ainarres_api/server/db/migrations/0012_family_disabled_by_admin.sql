-- 0012: who disabled a family, as far as governance needs it (ADR 0008).
--
-- An overseer may not undo an admin's decision: a family an admin disabled (PATCH or disable with
-- seat:admin) can be re-enabled only by an admin. Re-enabling clears the mark.
ALTER TABLE families ADD COLUMN disabled_by_admin boolean NOT NULL DEFAULT false;
