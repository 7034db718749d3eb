-- Schema 4: what each VM's cloud-init seed was built from, so that reconcile builds the
-- same seed again when its volume vanished (same instance-id, keys, user-data and
-- network-config), instead of one with the default keys only.
-- user_data may hold secrets: this table is never returned by the API nor written to the
-- audit log, and agent.db (with its -wal and -shm files) is kept at mode 0600.
-- A VM created before schema 4 has no row here; its seed is rebuilt with the default keys.

CREATE TABLE vm_seeds (
    name                TEXT    PRIMARY KEY REFERENCES vms(name) ON DELETE CASCADE,
    -- JSON array of the authorized_keys lines written into the seed.
    ssh_authorized_keys TEXT    NOT NULL,
    -- The request's raw user-data (NULL: the agent generated it from the keys).
    user_data           TEXT,
    network_config      TEXT
);
