-- Schema 6: vms.last_state, the state libvirt last showed for the VM's domain, is checked
-- like desired_state: one of libvirt's states or 'missing' (no such domain), spelled as
-- model::VmState spells them. SQLite adds a CHECK only by rebuilding the table
-- (https://www.sqlite.org/lang_altertable.html#otheralter); the migration runs with
-- foreign keys off, so vm_seeds keeps its rows, and is checked before it commits.
-- A value outside the list (never written by an earlier agent) becomes NULL.

CREATE TABLE vms_new (
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
    -- libvirt's state when the agent last looked (written when it changes; NULL until
    -- then), and the last IP its lease gave.
    last_state      TEXT    CHECK (last_state IN ('nostate', 'running', 'blocked', 'paused', 'shutdown', 'shutoff', 'crashed', 'pmsuspended', 'missing')),
    last_ip         TEXT,
    last_ip_at      TEXT,
    created_at      TEXT    NOT NULL,
    updated_at      TEXT    NOT NULL,
    created_by      TEXT    NOT NULL
);

INSERT INTO vms_new
SELECT name, uuid, instance_id, hostname, memory_mib, vcpus, disk_size_gb, network_name,
       os_arch, domain_type, image, mac, kernel, initrd, cmdline, ssh_keys, user_data,
       disk_volume, seed_volume, desired_state,
       CASE WHEN last_state IN ('nostate', 'running', 'blocked', 'paused', 'shutdown',
                                'shutoff', 'crashed', 'pmsuspended', 'missing')
            THEN last_state END,
       last_ip, last_ip_at, created_at, updated_at, created_by
FROM vms;

DROP TABLE vms;
ALTER TABLE vms_new RENAME TO vms;
