-- Anonymous browsers get a signed pin cookie instead of a registry session.
-- Each node reports, with its load, how many pins it issued recently (an
-- estimate shown by `list-nodes`); like the load, it is not announced.
-- Session kinds are now `backend`, `user` and (until their cookies expire)
-- `affinity`; the kind column is free text, so no change is needed there.
ALTER TABLE sessionlb_nodes ADD COLUMN pins_recent BIGINT NOT NULL DEFAULT 0;
