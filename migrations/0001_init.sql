-- Schema 1: port maps, node settings and the audit log.
-- Times are ISO-8601 UTC text (e.g. 2026-11-26T11:14:13.123Z) so that `sqlite3 agent.db`
-- shows them as they are.

CREATE TABLE port_maps (
    proto        TEXT    NOT NULL CHECK (proto IN ('tcp', 'udp')),
    listen_port  INTEGER NOT NULL CHECK (listen_port BETWEEN 1 AND 65535),
    target_ip    TEXT    NOT NULL,
    target_port  INTEGER NOT NULL CHECK (target_port BETWEEN 1 AND 65535),
    created_at   TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL,
    -- Who created or last changed the map: 'token', 'import:portmap.json', ...
    created_by   TEXT    NOT NULL,
    updated_by   TEXT    NOT NULL,
    PRIMARY KEY (proto, listen_port)
) WITHOUT ROWID;

-- Small facts about this node: identity, one-time imports, ...
CREATE TABLE node_settings (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    updated_at  TEXT NOT NULL
) WITHOUT ROWID;

-- One row for every mutating API call (refused ones included) and every change the agent
-- made on its own (imports, drift repairs).
CREATE TABLE audit_log (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at           TEXT    NOT NULL,
    client_addr  TEXT,
    -- How the caller was authorised: 'token', 'none' (refused), 'agent' (the agent itself).
    identity     TEXT    NOT NULL,
    -- 'POST /ports', 'DELETE /ports/{listen_port}', 'reconcile', 'import', ...
    action       TEXT    NOT NULL,
    -- The request's parameters as sent (path, query and body), truncated to 4 KiB.
    parameters   TEXT,
    outcome      TEXT    NOT NULL CHECK (outcome IN ('ok', 'refused', 'failed')),
    status       INTEGER,
    error        TEXT
);
CREATE INDEX audit_log_at ON audit_log (at);
