"""The storm: a mesh under pod traffic for a long run, under a seeded fault schedule, an
attacker on the underlay and clock steps (`python -m benchmarks.storm`, README "The storm").

- schedule.py: the fault schedule from a seed (pure, replayable);
- analysis.py: what the run recorded, read back (ping gaps, TCP stalls, the underlay
  capture's classes, key state, leaks) and the report (JSON, Markdown, PNG);
- rig.py: the testbed, the agents, the pods' traffic, the faults and the samplers;
- tcp_stream.py, packets.py: run inside the pods' and the underlay's namespaces.
"""
