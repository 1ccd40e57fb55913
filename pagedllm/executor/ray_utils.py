"""What the Ray executor (tensor-parallel ranks) and the Ray-hosted engine cores
(data-parallel replicas, engine/ray_core.py) share: connecting to the cluster, reserving
room for actors in a placement group, and freeing both. Ray is optional
(`pip install pagedllm[ray]`); this module imports it only when called, and no torch,
so that the API server can use it.
"""

from __future__ import annotations

import os

# How long to wait for the cluster to have room for the actors before giving up.
PLACEMENT_TIMEOUT_S = float(os.environ.get("PAGEDLLM_RAY_PLACEMENT_TIMEOUT_S", "120"))


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise ModuleNotFoundError("distributed_executor_backend='ray' needs Ray: pip install 'pagedllm[ray]'",
                                  name="ray") from e
    return ray


def connect():
    """Ray, connected: `ray.init()` joins the cluster at RAY_ADDRESS or the one `ray start`
    started on this machine, or else starts a local one; inside an actor it is connected."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init()
    return ray


def reserve(bundles: list[dict[str, float]], strategy: str, what: str):
    """A placement group of these bundles, once the cluster has room for them; a
    RuntimeError naming `what` and the cluster's resources after PLACEMENT_TIMEOUT_S."""
    ray = connect()
    from ray.util.placement_group import placement_group

    group = placement_group(bundles, strategy=strategy)
    try:
        ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise RuntimeError(f"the Ray cluster has no room for {what} after {PLACEMENT_TIMEOUT_S:.0f} s; "
                               f"its resources: {ray.cluster_resources()}")
    except BaseException:
        ray.util.remove_placement_group(group)
        raise
    return group


def place(actor_class, group, index: int, bundle: dict[str, float]):
    """actor_class with the options to run in bundle `index` of `group`, holding all of it."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
    return actor_class.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), scheduling_strategy=strategy)


def release(actors: list, group) -> None:
    """Kill the actors and free their placement group."""
    import ray

    if not ray.is_initialized():  # the cluster is already gone (interpreter exit)
        return
    for actor in actors:
        ray.kill(actor)
    ray.util.remove_placement_group(group)
