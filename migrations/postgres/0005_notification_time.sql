-- Every notification carries `at`: the database's clock (ms since the epoch)
-- when the change was made, so that a node can measure how long changes take
-- to reach it (`sessionlb_notification_lag_seconds`). Nodes that do not know
-- the field ignore it. (SQLite's change log has always recorded `at`.)
-- Bodies otherwise as in 0004 (the channel of the registry's own schema).
CREATE OR REPLACE FUNCTION sessionlb_notify_cluster() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify(
        CASE WHEN TG_TABLE_SCHEMA = 'public' THEN 'sessionlb' ELSE 'sessionlb.' || TG_TABLE_SCHEMA END,
        json_build_object('t', 'cluster', 'at', CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT))::text);
    RETURN NULL;
END $$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION sessionlb_notify_node() RETURNS trigger AS $$
DECLARE
    channel TEXT := CASE WHEN TG_TABLE_SCHEMA = 'public' THEN 'sessionlb' ELSE 'sessionlb.' || TG_TABLE_SCHEMA END;
    at BIGINT := CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT);
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify(channel, json_build_object('t', 'node', 'id', OLD.id, 'at', at)::text);
    ELSE
        PERFORM pg_notify(channel, json_build_object('t', 'node', 'id', NEW.id, 'at', at)::text);
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION sessionlb_notify_session() RETURNS trigger AS $$
DECLARE
    channel TEXT := CASE WHEN TG_TABLE_SCHEMA = 'public' THEN 'sessionlb' ELSE 'sessionlb.' || TG_TABLE_SCHEMA END;
    at BIGINT := CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT);
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify(channel, json_build_object('t', 'session_delete', 'key', OLD.key, 'at', at)::text);
    ELSE
        PERFORM pg_notify(channel, json_build_object(
            't', 'session', 'key', NEW.key, 'node_id', NEW.node_id, 'user_name', NEW.user_name,
            'kind', NEW.kind, 'created', NEW.created, 'last_active', NEW.last_active, 'at', at)::text);
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;
