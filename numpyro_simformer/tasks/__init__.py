"""Benchmark tasks of the Simformer paper as NumPyro models, with reference answers.

Each constructor returns a :class:`Task`: the simulator as a NumPyro model (parameter
site(s) ``theta``/``theta_i``, data site(s) ``x``/``x_i``), an explicit-likelihood model for
NUTS, and its references:

=================== ===================================== ==================================
task                observations / posterior references   any conditional
=================== ===================================== ==================================
linear_gaussian     sbibm ``gaussian_linear`` (10 each)   exact Gaussian conditioning
gaussian_mixture    sbibm ``gaussian_mixture``            NUTS (component summed out)
two_moons           sbibm ``two_moons``                   exact (closed form and 1-d grids)
slcp                sbibm ``slcp``                        NUTS, folding its 4 sign modes
tree                none                                  exact, grid belief propagation
hmm                 none                                  exact, grid forward-backward
lotka_volterra      none                                  NUTS on the model (ODE in diffrax)
=================== ===================================== ==================================

sbibm's files are downloaded once (see :mod:`numpyro_simformer.tasks.sbibm_data`).

Example:
    >>> import jax
    >>> from numpyro_simformer.tasks import tree, random_condition_masks
    >>> task = tree()
    >>> joint = task.flatten(task.simulate(jax.random.key(0), 1))[0]
    >>> mask = random_condition_masks(jax.random.key(1), task, 1)[0]
    >>> draws = task.reference_conditional(jax.random.key(2), task.observed_from_mask(joint, mask), 100)
"""

from numpyro_simformer.tasks.gaussian import (
    GaussianConditional,
    gaussian_mixture,
    linear_gaussian,
    linear_gaussian_conditional,
)
from numpyro_simformer.tasks.graphical import hmm, tree
from numpyro_simformer.tasks.nonlinear import TwoMoonsLikelihood, slcp, two_moons
from numpyro_simformer.tasks.reference import (
    ReferenceConvergenceWarning,
    ReferenceDiagnostics,
    ReferenceNotConvergedError,
    Reflection,
    nuts_reference,
    nuts_reference_with_diagnostics,
)
from numpyro_simformer.tasks.sbibm_data import SbibmDataUnavailableError, ensure_sbibm_files, sbibm_cache_dir
from numpyro_simformer.tasks.task import Task, random_condition_masks
from numpyro_simformer.tasks.timeseries import lotka_volterra

__all__ = [
    "Task",
    "linear_gaussian",
    "linear_gaussian_conditional",
    "GaussianConditional",
    "gaussian_mixture",
    "two_moons",
    "TwoMoonsLikelihood",
    "slcp",
    "tree",
    "hmm",
    "lotka_volterra",
    "Reflection",
    "nuts_reference",
    "nuts_reference_with_diagnostics",
    "ReferenceDiagnostics",
    "ReferenceNotConvergedError",
    "ReferenceConvergenceWarning",
    "random_condition_masks",
    "SbibmDataUnavailableError",
    "ensure_sbibm_files",
    "sbibm_cache_dir",
]
