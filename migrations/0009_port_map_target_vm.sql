-- Port maps that name a VM (issue 13): `target_vm` is the VM the client named; the
-- agent keeps `target_ip` at that VM's address (its pinned one, else its last seen), and
-- removes the map with the VM. NULL: a map to an address, as before.
ALTER TABLE port_maps ADD COLUMN target_vm TEXT;
CREATE INDEX port_maps_by_vm ON port_maps (target_vm) WHERE target_vm IS NOT NULL;
