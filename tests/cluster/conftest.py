"""Fixtures for the cluster tests: tiny shards (once per session) and a local SLURM cluster."""
from __future__ import annotations

import pytest

from .common import build_tiny_shards
from .slurm_cluster import LocalSlurm


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    return build_tiny_shards(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="module")
def slurm_cluster():
    """A real one-node SLURM cluster (munged, slurmctld, slurmd) in its own state dir, stopped by pid."""
    cluster = LocalSlurm()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
