"""Membership from a datastore instead of a mesh file (etcd: `--datastore etcd://...`).

Layout under the prefix (default `/vppmesh`):

- `settings`: the mesh settings (JSON, the MeshSettings model). Stored once, by the
  first agent started with `--settings FILE` (create-if-absent); the datastore is the
  source of truth afterwards, so every node agrees on them.
- `nodes/<name>`: one record per node (JSON, the Node model), bound to that node's lease.
- `numbers/<n>`: the claim on node number n (value: the owner's name). Not leased: a
  node that restarts or comes back keeps its number; `vppmesh down` releases it.
"""
