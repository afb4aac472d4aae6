"""The agent: its loop, its mesh sources, its control socket, its clock."""
