-- Activity writes and expiry (issue 12).
--
-- touch_sessions sets last_active of every active session every
-- touch-interval. Both indexes that held last_active (sessionlb_sessions_active
-- and sessionlb_sessions_user) made every such update write a new entry into
-- every index of the table (no HOT update). No query reads by user, and
-- expiry no longer needs an index: both go, and pages keep room for HOT
-- updates.
--
-- Expiry ran on every node once per period, a sequential scan each with
-- clock_timestamp() evaluated per row. Now one node per period does it for
-- the whole cluster: the `expiry` row of sessionlb_housekeeping records when
-- it last ran, and a node's expiry statement deletes only if it moved that
-- row forward (one scan per period for the cluster, the cutoff computed once).
DROP INDEX sessionlb_sessions_active;
DROP INDEX sessionlb_sessions_user;
ALTER TABLE sessionlb_sessions SET (fillfactor = 80);

CREATE TABLE sessionlb_housekeeping (
    task     TEXT   PRIMARY KEY,
    last_run BIGINT NOT NULL
);
INSERT INTO sessionlb_housekeeping (task, last_run) VALUES ('expiry', 0);
