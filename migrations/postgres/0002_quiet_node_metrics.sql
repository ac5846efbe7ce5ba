-- Load reports (every few seconds per node) and check-ins change only a node's
-- measurements: announcing them made every node reload the node table on every
-- report of every other node. Nodes re-read those figures on their own
-- schedule; only changes that matter to routing are announced.
DROP TRIGGER sessionlb_nodes_changed ON sessionlb_nodes;
CREATE TRIGGER sessionlb_nodes_added_or_removed AFTER INSERT OR DELETE ON sessionlb_nodes
    FOR EACH ROW EXECUTE FUNCTION sessionlb_notify_node();
CREATE TRIGGER sessionlb_nodes_changed AFTER UPDATE ON sessionlb_nodes
    FOR EACH ROW
    WHEN ((OLD.host, OLD.port, OLD.ipv4, OLD.status, OLD.router, OLD.version, OLD.offline_mode, OLD.started_at)
          IS DISTINCT FROM
          (NEW.host, NEW.port, NEW.ipv4, NEW.status, NEW.router, NEW.version, NEW.offline_mode, NEW.started_at))
    EXECUTE FUNCTION sessionlb_notify_node();
