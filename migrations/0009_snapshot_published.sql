-- Philotes buffer schema, version 9: what of a table the publication held when it was copied.
--
-- A table's column list or row filter (spec.source.tables[].columns, .where) decides which
-- of its columns and rows are captured. Changed, the rows it now takes in were never copied,
-- and the rows it leaves out stay in the consumer's view: the table is copied again (request
-- `changed`), and the consumer rule of a finished copy (README: Snapshots) removes the rows
-- no longer published. NULL in rows written before this version: taken as what the
-- publication holds on the first start after it.
ALTER TABLE cdc_snapshots
    ADD COLUMN published text;  -- the table's entry in the publication, e.g. `columns (a, b), rows WHERE (x > 1)`
