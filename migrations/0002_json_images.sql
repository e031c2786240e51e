-- Philotes buffer schema, version 2: row images are json, not jsonb.
--
-- The images are written once and read in order by downstream writers, which parse them
-- anyway; as jsonb, the buffer server parsed every document into a tree, sorted its keys and
-- converted its numbers on the way in, the largest part of its work per event (about 30% of a
-- COPY of narrow rows, measured in bench/RESULTS.md). json keeps the text Philotes wrote,
-- still validated: keys in column order, numbers and embedded documents exactly as sent.
-- Cast to jsonb for its operators (after::jsonb ? 'col', @>, jsonb_set).
ALTER TABLE cdc_events
    ALTER COLUMN before TYPE json USING before::json,
    ALTER COLUMN after TYPE json USING after::json;
