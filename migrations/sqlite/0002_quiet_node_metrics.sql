-- Load reports (every few seconds per node) and check-ins change only a node's
-- measurements: announcing them made every node reload the node table on every
-- report of every other node. Nodes re-read those figures on their own
-- schedule; only changes that matter to routing are announced.
DROP TRIGGER sessionlb_nodes_upd;
CREATE TRIGGER sessionlb_nodes_upd AFTER UPDATE ON sessionlb_nodes
    WHEN OLD.host IS NOT NEW.host OR OLD.port IS NOT NEW.port OR OLD.ipv4 IS NOT NEW.ipv4
      OR OLD.status IS NOT NEW.status OR OLD.router IS NOT NEW.router OR OLD.version IS NOT NEW.version
      OR OLD.offline_mode IS NOT NEW.offline_mode OR OLD.started_at IS NOT NEW.started_at BEGIN
    INSERT INTO sessionlb_changes (payload, at) VALUES (json_object('t', 'node', 'id', NEW.id), CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER));
END;
