-- Per-map source allow-lists (issue 13).
-- One row per allowed network, as the client's list after normalisation (no host bits,
-- none inside another). No rows: the map is open to every source, as before.
CREATE TABLE port_map_allow (
    proto        TEXT    NOT NULL,
    listen_port  INTEGER NOT NULL,
    -- 'a.b.c.d/len', the network address.
    cidr         TEXT    NOT NULL,
    PRIMARY KEY (proto, listen_port, cidr),
    FOREIGN KEY (proto, listen_port) REFERENCES port_maps (proto, listen_port)
        ON DELETE CASCADE
) WITHOUT ROWID;
