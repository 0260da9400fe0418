"""The federated engine: one round loop (``simulation``), strategies as hooks, and their registry.

Importing the package registers every strategy, whichever module is imported first (the strategy
modules import ``strategies``; registering them here, not at the end of ``strategies``, keeps the
import graph free of cycles).
"""

from . import strategies  # noqa: F401  (the registry and the plain strategies)
from . import dp_fisher, dp_strategies, feddpa, mm_pfl_adp, mr_mtl, personalized_strategies, sample_level  # noqa: F401  (imported to register themselves)
from . import cross_silo_dp_sgd  # noqa: F401  (registers cross-silo-dp-sgd)
from . import mm_pfl_adp_cross_silo  # noqa: F401  (registers mm-pfl-adp-cross-silo)
from . import vectorized  # noqa: F401  (registers the vectorised engine in simulation.ENGINES)
