-- Schema 7: vms.pinned_ip, the IPv4 address the agent reserved for the VM in its network's
-- DHCP range (a <dhcp><host mac name ip/> entry, see docs/decisions.md). NULL for VMs
-- created before: they keep whatever address DHCP gives them, as before.

ALTER TABLE vms ADD COLUMN pinned_ip TEXT;
