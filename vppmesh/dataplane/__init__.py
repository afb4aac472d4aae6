"""VPP's side: the node's view, plan(), reconcile() and the VPP API modules."""
