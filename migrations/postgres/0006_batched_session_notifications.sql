-- Session changes announced per statement, not per row (issue 12). Every
-- notification wakes every listening node and, in PostgreSQL, every
-- listening backend: a 10,000-row insert used to send 10,000 of them, an
-- expiry that ended 1,000 sessions 1,000. Now one statement sends one
-- notification per ~7 KB of changes (a payload may not exceed 8,000 bytes):
--   {"t":"sessions","at":…,"s":[{session}, …]}   added, moved, user set
--   {"t":"session_deletes","at":…,"keys":[…]}    ended
-- A statement that changes one row (a placement, a move, one delete) still
-- sends the payload of 0001-0005 ({"t":"session",…} / {"t":"session_delete",…}),
-- which nodes of earlier versions understand during a rolling upgrade (they
-- reload the registry on the batched forms they do not know).
-- Activity (last_active) changes are still not announced.

DROP TRIGGER sessionlb_sessions_added_or_removed ON sessionlb_sessions;
DROP TRIGGER sessionlb_sessions_moved ON sessionlb_sessions;

CREATE FUNCTION sessionlb_notify_sessions() RETURNS trigger AS $$
DECLARE
    channel TEXT := CASE WHEN TG_TABLE_SCHEMA = 'public' THEN 'sessionlb' ELSE 'sessionlb.' || TG_TABLE_SCHEMA END;
    at BIGINT := CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT);
    deleting BOOLEAN := TG_OP = 'DELETE';
    head TEXT;
    single_head TEXT;
    items TEXT[];
    item TEXT;
    first_item TEXT;
    batch TEXT := '';
    n INTEGER := 0;
    sent BOOLEAN := FALSE;
BEGIN
    IF deleting THEN
        head := '{"t":"session_deletes","at":' || at || ',"keys":[';
    ELSE
        head := '{"t":"sessions","at":' || at || ',"s":[';
    END IF;
    -- Each branch names only the transition tables its event has.
    IF deleting THEN
        items := ARRAY(SELECT to_json(o.key)::text FROM old_rows o);
    ELSIF TG_OP = 'INSERT' THEN
        items := ARRAY(
            SELECT json_build_object('key', r.key, 'node_id', r.node_id, 'user_name', r.user_name, 'kind', r.kind,
                                     'created', r.created, 'last_active', r.last_active)::text
            FROM new_rows r);
    ELSE
        items := ARRAY(
            SELECT json_build_object('key', r.key, 'node_id', r.node_id, 'user_name', r.user_name, 'kind', r.kind,
                                     'created', r.created, 'last_active', r.last_active)::text
            FROM new_rows r JOIN old_rows o ON o.key = r.key
            WHERE o.node_id IS DISTINCT FROM r.node_id OR o.user_name IS DISTINCT FROM r.user_name);
    END IF;
    FOREACH item IN ARRAY items LOOP
        IF n > 0 AND octet_length(batch) + octet_length(item) > 7000 THEN
            PERFORM pg_notify(channel, head || batch || ']}');
            sent := TRUE;
            batch := '';
            n := 0;
        END IF;
        IF n = 0 THEN
            batch := item;
            first_item := item;
        ELSE
            batch := batch || ',' || item;
        END IF;
        n := n + 1;
    END LOOP;
    IF n = 1 AND NOT sent THEN
        -- One row: the payload every version knows.
        IF deleting THEN
            PERFORM pg_notify(channel, '{"t":"session_delete","at":' || at || ',"key":' || first_item || '}');
        ELSE
            PERFORM pg_notify(channel, '{"t":"session","at":' || at || ',' || substr(first_item, 2));
        END IF;
    ELSIF n > 0 THEN
        PERFORM pg_notify(channel, head || batch || ']}');
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;

-- Transition tables need one trigger per event.
CREATE TRIGGER sessionlb_sessions_added AFTER INSERT ON sessionlb_sessions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sessionlb_notify_sessions();
CREATE TRIGGER sessionlb_sessions_moved AFTER UPDATE ON sessionlb_sessions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sessionlb_notify_sessions();
CREATE TRIGGER sessionlb_sessions_removed AFTER DELETE ON sessionlb_sessions
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sessionlb_notify_sessions();
