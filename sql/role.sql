-- A least-privilege role for walstream: it can open replication connections and read the
-- watched tables (for backfill), and nothing else. It owns nothing and writes nothing.
CREATE ROLE walstream WITH LOGIN REPLICATION PASSWORD 'change-me';

-- Heartbeats: a tiny WAL message every heartbeat_secs keeps the slot advancing on a quiet
-- database (set replication.heartbeat_secs = 0 to go without).
GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO walstream;
-- Backfill (walstream backfill) writes its chunks the same way, as bytes.
GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, bytea) TO walstream;

GRANT USAGE ON SCHEMA public TO walstream;
GRANT SELECT ON public.tb_order, public.tb_order_item TO walstream;

-- This role cannot create the publication (that needs ownership of the tables): a table owner
-- runs sql/setup.sql, and walstream runs with replication.create_publication = false. Creating
-- the slot needs only REPLICATION, so replication.create_slot may stay true.
