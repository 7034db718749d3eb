-- Schema 2: the mesh join. The last successful join response is the desired state of the
-- WireGuard link; the tunnel is rebuilt from it when the controller is away at boot.

CREATE TABLE mesh_join (
    -- One row: this node has one controller.
    id                 INTEGER PRIMARY KEY CHECK (id = 1),
    node_id            TEXT    NOT NULL,
    -- The public key this node joined with (never the private key).
    node_pubkey        TEXT    NOT NULL,
    node_ip            TEXT    NOT NULL,
    controller_pubkey  TEXT    NOT NULL,
    endpoint           TEXT    NOT NULL,
    -- Comma-separated CIDRs, as the controller sent them (e.g. 10.50.0.1/32).
    allowed_ips        TEXT    NOT NULL,
    wg_net             TEXT    NOT NULL,
    controller_url     TEXT    NOT NULL,
    -- The controller's response as received, for operators used to join.json.
    raw_response       TEXT    NOT NULL,
    first_joined_at    TEXT    NOT NULL,
    joined_at          TEXT    NOT NULL
);
