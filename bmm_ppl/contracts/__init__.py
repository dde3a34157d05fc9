"""The ground floor: what models hand exact engines, and how hyperparameters are specified.

Both :mod:`bmm_ppl.models` and :mod:`bmm_ppl.inference` import from here, so engines never import the
model builders. Nothing here imports anything else of the package except :mod:`bmm_ppl.validation`.

- :class:`Fixed`, :class:`Learned`, :class:`Hyperprior`: a hyperparameter as a number, a type-II
  ``pyro.param`` or a ``pyro.sample`` site with a hyperprior.
- :class:`IsotropicRegressionForm`, :class:`GaussianPriorRegressionForm`: conjugate regression
  structures that ``Exact`` integrates.
- :class:`StateSpaceForm` (with :class:`LinearGaussianParams`): what ``Kalman`` integrates.
- :class:`GaussianProcessForm`: what ``GPEvidence`` integrates.
"""

from bmm_ppl.contracts.gaussian_process import GaussianProcessForm
from bmm_ppl.contracts.hyperparameters import Fixed, Hyperprior, Learned
from bmm_ppl.contracts.regression_forms import GaussianPriorRegressionForm, IsotropicRegressionForm
from bmm_ppl.contracts.state_space import LearnedMatrix, LinearGaussianParams, StateSpaceForm

__all__ = [
    "Fixed",
    "GaussianPriorRegressionForm",
    "GaussianProcessForm",
    "Hyperprior",
    "IsotropicRegressionForm",
    "Learned",
    "LearnedMatrix",
    "LinearGaussianParams",
    "StateSpaceForm",
]
