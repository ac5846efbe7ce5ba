-- Anonymous browsers get a signed pin cookie instead of a registry session.
-- Each node reports, with its load, how many pins it issued recently (an
-- estimate shown by `list-nodes`); like the load, it is not announced (the
-- node trigger of 0002 lists the columns that are).
ALTER TABLE sessionlb_nodes ADD COLUMN pins_recent INTEGER NOT NULL DEFAULT 0;
