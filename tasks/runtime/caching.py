"""Prefect task wrappers whose cache key is the content of their inputs.

The key is the hash of the task's parameters (frozen configs, upstream manifests with their
content keys, the workspace root) plus the task's source, so a cached result is reused
across runs and processes, and changes when the code or any input changes. Results are
persisted under the workspace (see `qrobust.flows.grid`).
"""

from __future__ import annotations

from qrobust.tasks.config import config_hash


def parameters_key(context, parameters: dict) -> str:
    return config_hash({name: value for name, value in parameters.items()})


def stage(name: str, retries: int = 0):
    """Decorate a pure stage function as a cached, persisted Prefect task."""
    from prefect import task
    from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy

    return task(
        name=name,
        cache_policy=TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=parameters_key),
        persist_result=True,
        retries=retries,
        log_prints=False,
    )
