"""The authenticated channel between the agents of each node pair (docs/design.md)."""
