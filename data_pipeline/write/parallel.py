"""Several processes on one build: the MPI communicator found from the launcher's environment,
and rank-local work that every rank hears the outcome of (`all_ranks`)."""
from __future__ import annotations

import os

from ..basics.errors import ConfigError, DataError, TerrabyteError


def mpi_comm_from_env():
    """The MPI world communicator when launched by mpirun/srun with more than one rank, else None."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        if int(os.environ.get(var, "1") or 1) > 1:
            try:
                from mpi4py import MPI
            except ImportError:
                raise ConfigError("launched under MPI but mpi4py is not installed: pip install 'terrabyte[mpi]'") from None
            return MPI.COMM_WORLD
    return None


class all_ranks:
    """Context manager around rank-local work followed by a collective: every rank learns whether
    any rank failed, so no rank waits forever in the next collective. The failing rank re-raises
    its own error; the others raise one naming it: a DataError when it was bad input (a
    TerrabyteError or OSError: the CLI prints one line), a RuntimeError when it was a bug (its
    traceback is on the failing rank)."""

    def __init__(self, comm, rank: int):
        self.comm, self.rank = comm, rank

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.comm is None:
            return False
        mine = None
        if exc is not None:
            mine = (f"{exc_type.__name__}: {exc}", isinstance(exc, (TerrabyteError, OSError)))
        failed = [(r, e) for r, e in enumerate(self.comm.allgather(mine)) if e]
        if exc is not None or not failed:
            return False
        r, (e, bad_input) = failed[0]
        raise (DataError if bad_input else RuntimeError)(f"shard build failed on MPI rank {r}: {e}")
