"""Several engines at once: one engine replica per GPU (data parallel), each a Ray actor in its own process.

- cluster: how many replicas `--gpus N|all` (or, on a CPU, `--replicas N`) asks for; starting Ray on this host
  and the replicas on it; nothing here imports ray until replicas are really started (Ray is an optional extra);
- replica: the actor: a CSM model, one engine loop stepped by its own thread, `exchange` for `seseme batch` and
  `speak` / `abort` for `seseme serve`.

The front ends that drive them are batch/replicas.py (the manifest and the files stay in the driver) and
server/replicas.py (one HTTP front, requests routed to the least-loaded replica).
"""
