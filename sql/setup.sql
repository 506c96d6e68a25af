-- What `walstream setup` does, for a DBA to run by hand instead
-- (`walstream setup --print-sql` prints this for your own config).
-- Requires wal_level = logical (postgresql.conf, then a restart).

-- 1. The publication: the tables whose changes are streamed.
CREATE PUBLICATION walstream FOR TABLE public.tb_order, public.tb_order_item;

-- 2. The slot: PostgreSQL keeps the WAL walstream has not confirmed.
SELECT pg_create_logical_replication_slot('walstream', 'pgoutput');

-- 3. Every published table needs a replica identity: a primary key (the default), or FULL for
--    complete before images. Without one PostgreSQL rejects the table's UPDATEs and DELETEs.
-- ALTER TABLE public.tb_order REPLICA IDENTITY FULL;

-- 4. Bound the WAL a stopped walstream can hold back (PostgreSQL 13+).
-- ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf();
