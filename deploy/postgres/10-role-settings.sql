-- Run once, when the postgres container initialises an empty volume (docker-entrypoint-initdb.d).
-- The service sends its lock and statement time-outs as startup parameters, which PgBouncer refuses; with
-- AINARRES_PGBOUNCER=true it leaves them out, so they are the role's defaults here (AINARRES_LOCK_TIMEOUT_MS
-- and AINARRES_STATEMENT_TIMEOUT_MS; docs/operations.md "Limits"). The migration runner lifts both for its
-- own transactions (SET LOCAL).
ALTER ROLE ainarres IN DATABASE ainarres SET lock_timeout = '2s';
ALTER ROLE ainarres IN DATABASE ainarres SET statement_timeout = '10s';
