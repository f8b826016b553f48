"""The local Ray that init_ray starts: its processes know their own cluster's address."""

import os

import pytest

pytestmark = pytest.mark.ray


def test_local_cluster_processes_inherit_their_own_address(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    def address_seen_inside() -> tuple[str | None, str]:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        # what Ray Train's PlacementGroupCleaner (State API) resolves: RAY_ADDRESS first, never a scan of the
        # machine's Ray instances (which fails when another one runs)
        return os.environ.get("RAY_ADDRESS"), canonicalize_bootstrap_address_or_die(None)

    env, resolved = ray.get(address_seen_inside.remote())
    gcs = ray.get_runtime_context().gcs_address
    assert env == gcs and resolved == gcs
    # the driver's own environment is left as it was (a later init_ray must not connect to this instance)
    assert os.environ.get("RAY_GCS_SERVER_PORT") is None
