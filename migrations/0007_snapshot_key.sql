-- Philotes buffer schema, version 7: the key a snapshot's progress is noted in.
--
-- `last_key` and `reread` are values of the key the chunks are ordered by. Should that key
-- change during a copy (a new replica identity index or primary key, or a key column's type
-- or collation changed), those values mean nothing under the new one: the copy starts over
-- from the table's start (README: Snapshots). NULL in rows written before this version: taken
-- as the key of the first chunk read after it.
ALTER TABLE cdc_snapshots
    ADD COLUMN key_names json,  -- the key columns' names, in key order
    ADD COLUMN key_kinds json;  -- their types and collations, '<type oid>/<collation oid>'
