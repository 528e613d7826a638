"""How many engine replicas a command runs, and starting them: Ray on this host, one replica actor per GPU.

`--gpus N|all`: one replica per GPU. 1 (the default), or `all` on a host with one GPU, is the single-process path,
and nothing here imports ray then. `--replicas N` is the same data-parallel path on the CPU (`--device cpu`), for
tests and trials: N processes, each with its own copy of the model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass

from seseme_cli.errors import InputError, SesemeError

INSTALL_HINT = "pip install 'seseme[ray]'"
CLOSE_TIMEOUT_S = 10


@dataclass(frozen=True)
class ReplicaSpec:
    count: int
    model: str
    device: str  # "cuda" (one GPU per replica) or "cpu"


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def has_ray() -> bool:
    return importlib.util.find_spec("ray") is not None


def replica_count(gpus: str | None, replicas: int | None, device: str) -> int:
    """Engine replicas for `--gpus` / `--replicas` on `device` (1: the single-process path). Raises InputError for
    a combination that cannot run, and when more than one replica is asked for without Ray installed."""
    if replicas is not None:
        if gpus is not None:
            raise InputError("--gpus and --replicas exclude each other (--replicas is for CPU runs)")
        if device != "cpu":
            raise InputError("--replicas N runs N engine replicas on the CPU (with --device cpu); on GPUs use --gpus N")
        if replicas < 1:
            raise InputError(f"--replicas must be at least 1, got {replicas}")
        count = replicas
    elif gpus is None:
        return 1
    else:
        if gpus != "all" and not (gpus.isdigit() and int(gpus) >= 1):
            raise InputError(f"--gpus must be a number of GPUs (1 or more) or 'all', got {gpus!r}")
        if device != "cuda":
            raise InputError(f"--gpus {gpus}: it needs CUDA GPUs and this run is on the CPU (for engine replicas on "
                             "the CPU use --device cpu --replicas N)")
        visible = gpu_count()
        count = visible if gpus == "all" else int(gpus)
        if count > visible:
            raise InputError(f"--gpus {gpus}: only {visible} GPU{'s are' if visible != 1 else ' is'} visible here")
    if count > 1 and not has_ray():
        raise InputError(f"{count} engine replicas run through Ray, which is not installed: {INSTALL_HINT}")
    return max(count, 1)


class Cluster:
    """Ray on this host (started here unless the process already runs one) and `spec.count` replica actors,
    each with one GPU (or one CPU). `close()` stops the actors and a Ray this started."""

    def __init__(self, spec: ReplicaSpec):
        # Ray's driver would install absl's failure signal handler, which takes SIGTERM too: `seseme serve` would die
        # at once instead of draining. Read when ray is first imported (a process that imported it already keeps it).
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        import ray

        from seseme_cli.replicas.replica import Replica

        self.spec = spec
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            cpus = max(os.cpu_count() or 1, spec.count) if spec.device == "cpu" else None
            # Ray's own warnings (token set-up, signal handlers) only with -v: the CLI says what matters itself.
            quiet = logging.getLogger("seseme").getEffectiveLevel() > logging.DEBUG
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     logging_level=logging.ERROR if quiet else logging.WARNING)
        if spec.device == "cuda":
            seen = int(ray.cluster_resources().get("GPU", 0))
            if seen < spec.count:
                self.close()
                raise SesemeError(f"{spec.count} replicas need {spec.count} GPUs; Ray sees {seen} on this host")
        resources = {"num_gpus": 1} if spec.device == "cuda" else {"num_cpus": 1}
        remote = ray.remote(Replica).options(max_restarts=0, **resources)
        self.actors = [remote.remote(i, spec.model, spec.device) for i in range(spec.count)]

    def setup(self, **options) -> list:
        """Set every replica up (`Replica.setup(**options)`, all at once) -> their ReplicaInfo. A replica's own
        error (weights not found, say) is raised as it is, for the CLI's one line."""
        import ray

        try:
            return ray.get([actor.setup.remote(**options) for actor in self.actors])
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, SesemeError):
                raise e.cause from None
            raise SesemeError(f"an engine replica failed to start: {task_error(e)}") from None
        except ray.exceptions.RayActorError as e:
            raise SesemeError(f"an engine replica died while starting: {task_error(e)}") from None

    def close(self) -> None:
        import ray

        actors, self.actors = getattr(self, "actors", []), []
        with contextlib.suppress(Exception):  # a replica that died or hangs is killed below all the same
            ray.get([actor.close.remote() for actor in actors], timeout=CLOSE_TIMEOUT_S)
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        if self.started_ray:
            ray.shutdown()


def task_error(error: Exception) -> str:
    """A Ray error's cause in one line (Ray's own text carries the remote traceback)."""
    cause = getattr(error, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
