"""The host's side: the uplink NIC, host and pod links, VPP's guard, the unit."""
