-- Philotes buffer schema, version 8: the table a snapshot's progress is noted in.
--
-- A table replaced under its name during its copy (a new table swapped in by renames, as
-- online schema change tools do) is another table: its rows before the point the copy had
-- reached were never read. The copy notes the source table's OID it reads; a chunk read from
-- another one starts the copy over from the table's start, with a new `started_lsn`
-- (README: Snapshots). NULL in rows written before this version: taken as the table of the
-- first chunk read after it.
ALTER TABLE cdc_snapshots
    ADD COLUMN relation_id oid;  -- the source table's OID the copy reads
