-- sessionlb registry, SQLite (single machine). Never edit an applied migration: add a new one.
-- Times are milliseconds since the Unix epoch. SQLite cannot notify, so triggers append to
-- sessionlb_changes, which every node polls.

CREATE TABLE sessionlb_cluster (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    key_fingerprint TEXT    NOT NULL,
    protocol        TEXT    NOT NULL,
    defined_at      INTEGER NOT NULL,
    defined_by      INTEGER
);

CREATE TABLE sessionlb_nodes (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    host          TEXT    NOT NULL,
    port          INTEGER NOT NULL,
    ipv4          TEXT,
    status        TEXT    NOT NULL,
    last_seen     INTEGER,
    load1         REAL    NOT NULL DEFAULT 0,
    load5         REAL    NOT NULL DEFAULT 0,
    load15        REAL    NOT NULL DEFAULT 0,
    cpus          INTEGER NOT NULL DEFAULT 1,
    router        BOOLEAN NOT NULL DEFAULT FALSE,
    version       TEXT    NOT NULL DEFAULT '',
    clock_skew_ms INTEGER,
    offline_mode  BOOLEAN NOT NULL DEFAULT FALSE,
    started_at    INTEGER,
    UNIQUE (host, port)
);

CREATE TABLE sessionlb_sessions (
    key         TEXT    PRIMARY KEY,
    node_id     INTEGER REFERENCES sessionlb_nodes (id) ON DELETE SET NULL,
    user_name   TEXT,
    kind        TEXT    NOT NULL,
    created     INTEGER NOT NULL,
    last_active INTEGER NOT NULL
);
CREATE INDEX sessionlb_sessions_node ON sessionlb_sessions (node_id);
CREATE INDEX sessionlb_sessions_user ON sessionlb_sessions (user_name, last_active);
CREATE INDEX sessionlb_sessions_active ON sessionlb_sessions (last_active);

CREATE TABLE sessionlb_changes (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    payload TEXT    NOT NULL,
    at      INTEGER NOT NULL
);

CREATE TRIGGER sessionlb_cluster_ins AFTER INSERT ON sessionlb_cluster BEGIN
    INSERT INTO sessionlb_changes (payload, at) VALUES ('{"t":"cluster"}', CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER));
END;
CREATE TRIGGER sessionlb_cluster_upd AFTER UPDATE ON sessionlb_cluster BEGIN
    INSERT INTO sessionlb_changes (payload, at) VALUES ('{"t":"cluster"}', CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER));
END;
CREATE TRIGGER sessionlb_cluster_del AFTER DELETE ON sessionlb_cluster BEGIN
    INSERT INTO sessionlb_changes (payload, at) VALUES ('{"t":"cluster"}', CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER));
END;

CREATE TRIGGER sessionlb_nodes_ins AFTER INSERT ON sessionlb_nodes BEGIN
    INSERT INTO sessionlb_changes (payload, at) VALUES (json_object('t', 'node', 'id', NEW.id), CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER));
END;
CREATE TRIGGER sessionlb_nodes_upd AFTER UPDATE ON sessionlb_nodes BEGIN
    INSERT INTO sessionlb_changes (payload, at) VALUES (json_object('t', 'node', 'id', NEW.id), CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER));
END;
CREATE TRIGGER sessionlb_nodes_del AFTER DELETE ON sessionlb_nodes BEGIN
    INSERT INTO sessionlb_changes (payload, at) VALUES (json_object('t', 'node', 'id', OLD.id), CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER));
END;

CREATE TRIGGER sessionlb_sessions_ins AFTER INSERT ON sessionlb_sessions BEGIN
    INSERT INTO sessionlb_changes (payload, at) VALUES (json_object(
        't', 'session', 'key', NEW.key, 'node_id', NEW.node_id, 'user_name', NEW.user_name,
        'kind', NEW.kind, 'created', NEW.created, 'last_active', NEW.last_active),
        CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER));
END;
CREATE TRIGGER sessionlb_sessions_moved AFTER UPDATE ON sessionlb_sessions
    WHEN OLD.node_id IS NOT NEW.node_id OR OLD.user_name IS NOT NEW.user_name BEGIN
    INSERT INTO sessionlb_changes (payload, at) VALUES (json_object(
        't', 'session', 'key', NEW.key, 'node_id', NEW.node_id, 'user_name', NEW.user_name,
        'kind', NEW.kind, 'created', NEW.created, 'last_active', NEW.last_active),
        CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER));
END;
CREATE TRIGGER sessionlb_sessions_del AFTER DELETE ON sessionlb_sessions BEGIN
    INSERT INTO sessionlb_changes (payload, at) VALUES (json_object('t', 'session_delete', 'key', OLD.key),
        CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER));
END;
