-- Schema 3: virtual machines and base images. A row is the desired state of one libvirt
-- domain (or one image volume); the VM driver makes libvirt match it.

CREATE TABLE vms (
    name            TEXT    PRIMARY KEY,
    uuid            TEXT    NOT NULL UNIQUE,
    -- cloud-init meta-data instance-id: new for every (re)create, so cloud-init runs anew.
    instance_id     TEXT    NOT NULL,
    hostname        TEXT    NOT NULL,
    memory_mib      INTEGER NOT NULL,
    vcpus           INTEGER NOT NULL,
    disk_size_gb    INTEGER NOT NULL,
    network_name    TEXT    NOT NULL,
    os_arch         TEXT    NOT NULL,
    domain_type     TEXT    NOT NULL,
    -- Base image (a row of `images`); NULL for a blank disk (direct kernel boot).
    image           TEXT,
    mac             TEXT    NOT NULL UNIQUE,
    kernel          TEXT,
    initrd          TEXT,
    cmdline         TEXT,
    ssh_keys        INTEGER NOT NULL,
    user_data       INTEGER NOT NULL CHECK (user_data IN (0, 1)),
    disk_volume     TEXT    NOT NULL,
    seed_volume     TEXT    NOT NULL,
    -- What the operator last asked for; the domain is started at reconcile when 'running'.
    desired_state   TEXT    NOT NULL CHECK (desired_state IN ('running', 'stopped')),
    -- libvirt's state when the agent last looked, and the last IP its lease gave.
    last_state      TEXT,
    last_ip         TEXT,
    last_ip_at      TEXT,
    created_at      TEXT    NOT NULL,
    updated_at      TEXT    NOT NULL,
    created_by      TEXT    NOT NULL
);

CREATE TABLE images (
    name            TEXT    PRIMARY KEY,
    -- The URL it was downloaded from, or 'upload'.
    source          TEXT    NOT NULL,
    -- Checksum asked for (download) and checksum of what was stored.
    sha256_expected TEXT,
    sha256          TEXT,
    -- 'qcow2' or 'raw', from the file's own header.
    format          TEXT,
    size_bytes      INTEGER,
    state           TEXT    NOT NULL CHECK (state IN ('downloading', 'ready', 'failed')),
    error           TEXT,
    volume          TEXT    NOT NULL,
    created_at      TEXT    NOT NULL,
    updated_at      TEXT    NOT NULL,
    created_by      TEXT    NOT NULL
);
