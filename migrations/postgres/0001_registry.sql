-- sessionlb registry, PostgreSQL. Never edit an applied migration: add a new one.
-- Tables are prefixed so that the registry can share a database with Workbench's own.
-- Times are milliseconds since the Unix epoch on the database's clock.

CREATE TABLE sessionlb_cluster (
    id              SMALLINT PRIMARY KEY CHECK (id = 1),
    key_fingerprint TEXT     NOT NULL,
    protocol        TEXT     NOT NULL,
    defined_at      BIGINT   NOT NULL,
    defined_by      BIGINT
);

CREATE TABLE sessionlb_nodes (
    id            BIGSERIAL PRIMARY KEY,
    host          TEXT             NOT NULL,
    port          INTEGER          NOT NULL,
    ipv4          TEXT,
    status        TEXT             NOT NULL,
    last_seen     BIGINT,
    load1         DOUBLE PRECISION NOT NULL DEFAULT 0,
    load5         DOUBLE PRECISION NOT NULL DEFAULT 0,
    load15        DOUBLE PRECISION NOT NULL DEFAULT 0,
    cpus          INTEGER          NOT NULL DEFAULT 1,
    router        BOOLEAN          NOT NULL DEFAULT FALSE,
    version       TEXT             NOT NULL DEFAULT '',
    clock_skew_ms BIGINT,
    offline_mode  BOOLEAN          NOT NULL DEFAULT FALSE,
    started_at    BIGINT,
    UNIQUE (host, port)
);

CREATE TABLE sessionlb_sessions (
    key         TEXT   PRIMARY KEY,
    node_id     BIGINT REFERENCES sessionlb_nodes (id) ON DELETE SET NULL,
    user_name   TEXT,
    kind        TEXT   NOT NULL,
    created     BIGINT NOT NULL,
    last_active BIGINT NOT NULL
);
CREATE INDEX sessionlb_sessions_node ON sessionlb_sessions (node_id);
CREATE INDEX sessionlb_sessions_user ON sessionlb_sessions (user_name, last_active);
CREATE INDEX sessionlb_sessions_active ON sessionlb_sessions (last_active);

-- Change notifications: every node LISTENs on channel `sessionlb`.
CREATE FUNCTION sessionlb_notify_cluster() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('sessionlb', '{"t":"cluster"}');
    RETURN NULL;
END $$ LANGUAGE plpgsql;

CREATE FUNCTION sessionlb_notify_node() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('sessionlb', json_build_object('t', 'node', 'id', OLD.id)::text);
    ELSE
        PERFORM pg_notify('sessionlb', json_build_object('t', 'node', 'id', NEW.id)::text);
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;

CREATE FUNCTION sessionlb_notify_session() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('sessionlb', json_build_object('t', 'session_delete', 'key', OLD.key)::text);
    ELSE
        PERFORM pg_notify('sessionlb', json_build_object(
            't', 'session', 'key', NEW.key, 'node_id', NEW.node_id, 'user_name', NEW.user_name,
            'kind', NEW.kind, 'created', NEW.created, 'last_active', NEW.last_active)::text);
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;

CREATE TRIGGER sessionlb_cluster_changed AFTER INSERT OR UPDATE OR DELETE ON sessionlb_cluster
    FOR EACH ROW EXECUTE FUNCTION sessionlb_notify_cluster();
CREATE TRIGGER sessionlb_nodes_changed AFTER INSERT OR UPDATE OR DELETE ON sessionlb_nodes
    FOR EACH ROW EXECUTE FUNCTION sessionlb_notify_node();
CREATE TRIGGER sessionlb_sessions_added_or_removed AFTER INSERT OR DELETE ON sessionlb_sessions
    FOR EACH ROW EXECUTE FUNCTION sessionlb_notify_session();
-- Activity (last_active) changes are not announced: only moves and user changes.
CREATE TRIGGER sessionlb_sessions_moved AFTER UPDATE ON sessionlb_sessions
    FOR EACH ROW
    WHEN (OLD.node_id IS DISTINCT FROM NEW.node_id OR OLD.user_name IS DISTINCT FROM NEW.user_name)
    EXECUTE FUNCTION sessionlb_notify_session();
