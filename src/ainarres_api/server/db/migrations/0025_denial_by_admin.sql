-- 0025: a denial made by a caller holding seat:admin is an administrative decision that only seat:admin lifts, as
-- only an admin re-enables what an admin disabled (0012): an overseer could lift an admin's denial through either
-- lift (DELETE /v1/families/{key}/denials/{feature}, POST /v1/governance/lifts), found by a review.
ALTER TABLE denials ADD COLUMN by_admin boolean NOT NULL DEFAULT false;
-- Existing denials made through the denials route (governance NULL): by an admin if the maker's family holds
-- seat:admin now (who held it when they were made is not recorded); the bootstrap family's sub is `admin`.
UPDATE denials d SET by_admin = true
 WHERE d.governance IS NULL
   AND EXISTS (SELECT 1 FROM agents a JOIN family_features ff ON ff.family_key = a.family_key
                WHERE a.sub = d.created_by AND ff.feature = 'seat:admin');
