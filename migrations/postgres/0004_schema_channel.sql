-- Change notifications go to the channel of the registry's own schema, so
-- that two registries in one database (two clusters, each with its own
-- `database-schema`) never hear each other: `sessionlb.<schema>`, and plain
-- `sessionlb` for tables still in `public`, where earlier versions kept
-- them and listen. The node computes the same name
-- (config::database::notify_channel). Bodies otherwise as in 0001.
CREATE OR REPLACE FUNCTION sessionlb_notify_cluster() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify(
        CASE WHEN TG_TABLE_SCHEMA = 'public' THEN 'sessionlb' ELSE 'sessionlb.' || TG_TABLE_SCHEMA END,
        '{"t":"cluster"}');
    RETURN NULL;
END $$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION sessionlb_notify_node() RETURNS trigger AS $$
DECLARE
    channel TEXT := CASE WHEN TG_TABLE_SCHEMA = 'public' THEN 'sessionlb' ELSE 'sessionlb.' || TG_TABLE_SCHEMA END;
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify(channel, json_build_object('t', 'node', 'id', OLD.id)::text);
    ELSE
        PERFORM pg_notify(channel, json_build_object('t', 'node', 'id', NEW.id)::text);
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION sessionlb_notify_session() RETURNS trigger AS $$
DECLARE
    channel TEXT := CASE WHEN TG_TABLE_SCHEMA = 'public' THEN 'sessionlb' ELSE 'sessionlb.' || TG_TABLE_SCHEMA END;
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify(channel, json_build_object('t', 'session_delete', 'key', OLD.key)::text);
    ELSE
        PERFORM pg_notify(channel, json_build_object(
            't', 'session', 'key', NEW.key, 'node_id', NEW.node_id, 'user_name', NEW.user_name,
            'kind', NEW.kind, 'created', NEW.created, 'last_active', NEW.last_active)::text);
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;
