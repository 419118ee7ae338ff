"""The execution seam: a stage describes its work as batches and a picklable work object; an executor runs it.

A work object loads its heavy state once per worker in ``setup()`` (an index, store readers, a model) and turns
one batch into one result in ``__call__``. The stage never knows where that happens:

- :class:`InProcessExecutor` runs every batch in this process, in order: small runs and unit tests (no Ray).
- :class:`RayExecutor` runs them on a pool of Ray actors (:class:`Workers`: GPU or CPU share each, min/max
  count). All ``max_workers`` actors are asked for up front, so the autoscaler sees the demand; the run starts
  once ``min_workers`` are ready, and each further actor gets batches as soon as its node has joined and its
  ``setup()`` is done. A batch whose actor died is given to another (the dead one restarts and rejoins).

Both call ``on_result(key, result)`` in the driver once per batch — in order in process, as batches finish on
Ray — so the stage commits each batch's output as it comes, and a resumed run passes only the batches left.
The work must be deterministic per batch: then the executors give identical output.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pipeline.errors import ConfigError, ResourcesUnavailableError
from pipeline.ray_runtime import ensure_ray

log = logging.getLogger(__name__)

BatchT = TypeVar("BatchT")
ResultT = TypeVar("ResultT")
BatchT_contra = TypeVar("BatchT_contra", contravariant=True)
ResultT_co = TypeVar("ResultT_co", covariant=True)


class Work(Protocol[BatchT_contra, ResultT_co]):
    """What a stage runs on each batch; picklable before ``setup()`` (it travels to the workers)."""

    def setup(self) -> None: ...

    def __call__(self, batch: BatchT_contra) -> ResultT_co: ...


OnResult = Callable[[int, Any], None]


class Executor(Protocol):
    def run(self, work: Work[Any, Any], batches: Sequence[tuple[int, Any]], on_result: OnResult) -> None:
        """Run ``work`` on each (key, batch); ``on_result(key, result)`` once per batch, in the driver."""
        ...


class InProcessExecutor:
    """Every batch in this process, in the order given."""

    def run(self, work: Work[Any, Any], batches: Sequence[tuple[int, Any]], on_result: OnResult) -> None:
        work.setup()
        for key, batch in batches:
            on_result(key, work(batch))


@dataclass(frozen=True)
class Workers:
    """The Ray worker pool of a stage: how many, and what each asks Ray for (nothing changes the output)."""

    address: str | None = None  # Ray to connect to; None: start a local Ray (or use the one initialised)
    gpus_per_worker: float = 0  # 0: CPU workers; 1: one GPU each; 0.5: two workers per GPU
    cpus_per_worker: float = 1.0
    min_workers: int = 1  # the run waits until this many workers are ready
    max_workers: int | None = None  # the pool grows up to this many as nodes join; None: min_workers

    def __post_init__(self) -> None:
        for name in ("gpus_per_worker", "cpus_per_worker"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} (--{name.replace('_', '-')}) = {value}; must be ≥ 0")
        if self.min_workers < 1:
            raise ConfigError(f"min_workers (--min-workers) = {self.min_workers}; must be ≥ 1")
        if self.max_workers is not None and self.max_workers < self.min_workers:
            raise ConfigError(
                f"max_workers (--max-workers) = {self.max_workers}; must be ≥ min_workers ({self.min_workers})"
            )

    @property
    def most(self) -> int:
        return self.max_workers or self.min_workers

    @property
    def on_ray(self) -> bool:
        """Whether these settings ask for Ray: an address, GPU workers, or more than one worker."""
        return self.address is not None or self.gpus_per_worker > 0 or self.most > 1


WAIT_LOG_S = 30.0  # how often a run still waiting for its first workers says so


class ActorPool:
    """Actors created all at once (Ray keeps those it cannot place pending: the autoscaler's demand); an actor
    gets work once its ``ready()`` — which answers its device, e.g. "cuda" — has returned.

    Extraction's extractors and the answer side's workers share it.
    """

    def __init__(
        self,
        actors: Sequence[Any],
        min_ready: int,
        gpus: float,
        cpus: float,
        name: str = "worker",
        devices: Counter[str] | None = None,
        wait_timeout: float = 0,
        flags: tuple[str, str, str] = ("--min-workers", "--worker-wait-timeout", "--gpus-per-worker"),
    ) -> None:
        """``wait_timeout``: seconds ``wait_for_minimum`` waits (0: no limit); ``flags``: the settings that say
        the minimum, the wait and the GPUs per actor, as the user spells them (named by the timeout error)."""
        self.pending = {actor.ready.remote(): actor for actor in actors}  # ready() ref → actor
        self.wait_timeout, self.flags = wait_timeout, flags
        self.ready: list[Any] = []
        self.most, self.min_ready, self.gpus, self.cpus, self.name = len(actors), min_ready, gpus, cpus, name
        self.devices = Counter() if devices is None else devices  # ready actors by device
        self._device: dict[Any, str] = {}

    def ask_autoscaler(self, wanted: bool) -> None:
        """Ask the autoscaler for every GPU actor's bundle (an empty request withdraws it)."""
        from ray.autoscaler.sdk import request_resources

        if self.gpus:
            bundle = {"GPU": self.gpus, "CPU": self.cpus}
            request_resources(bundles=[bundle] * self.most if wanted else [])

    def poll(self) -> None:
        """Admit every actor whose ready() has answered; never blocks."""
        import ray

        if self.pending:
            self._admit(ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)[0])

    def wait_for_minimum(self) -> None:
        """Block until ``min_ready`` actors are ready; ResourcesUnavailableError past ``wait_timeout``."""
        import ray

        said = False
        deadline = time.monotonic() + self.wait_timeout if self.wait_timeout else math.inf
        self.poll()
        while (missing := self.min_ready - len(self.ready)) > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise ResourcesUnavailableError(self._shortfall(missing))
            log.log(
                logging.WARNING if said else logging.INFO,
                "waiting for %d more %s(s) (%g GPU, %g CPU each) to be placed and loaded",
                missing,
                self.name,
                self.gpus,
                self.cpus,
            )
            said = True
            self._admit(ray.wait(list(self.pending), num_returns=missing, timeout=min(WAIT_LOG_S, left))[0])

    def _shortfall(self, missing: int) -> str:
        """What was asked for, what is ready, and what the cluster has (in total and free now)."""
        import ray

        minimum, wait, gpus = self.flags
        offers = ", ".join(
            f"{name} {ray.cluster_resources().get(name, 0):g} ({ray.available_resources().get(name, 0):g} free)"
            for name in ("GPU", "CPU")
        )
        nodes = sum(node["Alive"] for node in ray.nodes())
        return (
            f"{missing} of {minimum} {self.min_ready} {self.name}(s) not ready after {wait} "
            f"{self.wait_timeout:g} s; each asks for {self.gpus:g} GPU and {self.cpus:g} CPU; the cluster offers "
            f"{offers} on {nodes} node(s). Add nodes with those resources (or let the autoscaler start them "
            f"in a longer wait), or lower {gpus} / {minimum}"
        )

    def stop(self) -> None:
        """Kill every actor (pending ones withdraw their resource demand)."""
        import ray

        for actor in [*self.pending.values(), *self.ready]:
            ray.kill(actor)
        self.pending.clear()

    def wait_for_one(self) -> None:
        """Block until at least one actor is ready (all of them restarting after deaths, say)."""
        import ray

        while not self.ready:
            self._admit(ray.wait(list(self.pending), num_returns=1, timeout=WAIT_LOG_S)[0])

    def lost(self, actor: Any) -> None:
        """An actor that died: Ray restarts it; it gets work again once ``ready()`` answers anew."""
        if actor in self.ready:
            self.ready.remove(actor)
            self.devices[self._device.pop(actor)] -= 1
            self.pending[actor.ready.options(max_task_retries=-1).remote()] = actor  # waits out the restart

    def _admit(self, answered: list[Any]) -> None:
        import ray

        for ref in answered:
            device = ray.get(ref)  # re-raises an actor's start-up failure (bad weights, ...)
            actor = self.pending.pop(ref)
            self.ready.append(actor)
            self._device[actor] = device
            self.devices[device] += 1
            log.info("%s %d of %d ready on %s", self.name, len(self.ready), self.most, device)


class _WorkerActor(Generic[BatchT, ResultT]):
    """One Ray worker: the work's ``setup()`` runs at (re)start, then batches one at a time."""

    def __init__(self, work: Work[BatchT, ResultT]) -> None:
        self.work = work
        work.setup()

    def ready(self) -> str:
        import ray

        return "cuda" if ray.get_gpu_ids() else "cpu"

    def run(self, batch: BatchT) -> ResultT:
        return self.work(batch)


IN_FLIGHT_PER_WORKER = 2  # one running, one queued: a worker never waits for the driver
MAX_ATTEMPTS = 4  # a batch whose worker died this many times fails the run (a batch that kills workers)


class RayExecutor:
    """Batches on a pool of Ray actors (see :class:`Workers`)."""

    def __init__(self, workers: Workers = Workers()) -> None:
        self.workers = workers

    def run(self, work: Work[Any, Any], batches: Sequence[tuple[int, Any]], on_result: OnResult) -> None:
        import ray

        if not batches:
            return
        ensure_ray(self.workers.address)
        w = self.workers
        actor_class = ray.remote(num_cpus=w.cpus_per_worker, num_gpus=w.gpus_per_worker, max_restarts=-1)(
            _WorkerActor
        )
        shared = ray.put(work)  # once in the object store, not once per actor
        actors = [actor_class.remote(shared) for _ in range(w.most)]
        pool = ActorPool(actors, w.min_workers, w.gpus_per_worker, w.cpus_per_worker)
        pool.ask_autoscaler(True)
        try:
            pool.wait_for_minimum()
            _Dispatch(pool, batches).run(on_result)
        finally:
            pool.ask_autoscaler(False)
            for actor in [*pool.ready, *pool.pending.values()]:
                ray.kill(actor)


class _Dispatch:
    """Batches → ready actors (least busy first); a batch of a dead actor goes back to the queue."""

    def __init__(self, pool: ActorPool, batches: Sequence[tuple[int, Any]]) -> None:
        self.pool = pool
        self.queue: deque[tuple[int, Any, int]] = deque((key, batch, 1) for key, batch in batches)
        self.in_flight: dict[Any, tuple[Any, int, Any, int]] = {}  # ref → (actor, key, batch, attempt)

    def run(self, on_result: OnResult) -> None:
        import ray

        while self.queue or self.in_flight:
            self.pool.poll()
            if self.queue:
                self.pool.wait_for_one()
                self._submit()
            done, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=WAIT_LOG_S)
            for ref in done:
                actor, key, batch, attempt = self.in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    if attempt >= MAX_ATTEMPTS:
                        raise RuntimeError(
                            f"batch {key}: its worker died {attempt} times; giving up"
                        ) from exc
                    log.warning("batch %d: its worker died (%s); given to another", key, type(exc).__name__)
                    self.pool.lost(actor)
                    self.queue.appendleft((key, batch, attempt + 1))
                    continue
                on_result(key, result)

    def _submit(self) -> None:
        load = Counter(actor for actor, *_ in self.in_flight.values())
        while self.queue:
            actor = min(self.pool.ready, key=lambda a: load[a])
            if load[actor] >= IN_FLIGHT_PER_WORKER:
                return
            key, batch, attempt = self.queue.popleft()
            self.in_flight[actor.run.remote(batch)] = (actor, key, batch, attempt)
            load[actor] += 1


def executor_for(workers: Workers) -> Executor:
    """On Ray when ``workers`` asks for it (Workers.on_ray), else in this process."""
    return RayExecutor(workers) if workers.on_ray else InProcessExecutor()


@dataclass
class Progress:
    """A resumable batch run's progress over its queries, for the periodic lines and the summary."""

    verb: ClassVar[str] = "done"  # what the line says was done to the queries

    total: int  # queries
    done: int  # queries committed, resumed parts included
    started: float  # time.perf_counter() at the start
    resumed_parts: int = 0  # committed by an earlier run
    resumed_queries: int = 0  # their queries

    def add_queries(self, queries: int) -> None:
        self.done += queries

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def eta_s(self) -> float:
        """Seconds left at this run's pace (resumed queries did not cost this run anything)."""
        return (self.total - self.done) * self.elapsed() / max(self.done - self.resumed_queries, 1)

    def line(self) -> str:
        return f"{self.verb} {self.done}/{self.total} queries, ETA {self.eta_s():.0f} s"
