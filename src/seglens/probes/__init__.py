"""Linear probes that read per-token semantics out of one stage's features, trained from a stream.

Each stage of a forward pass feeds its own probe (D -> C with bias) and the batch is then dropped.
``LinearProbe`` (solver ``sgd``, ``sgd.py``) is softmax regression with several learning rates
trained side by side, the best chosen on a held-out part of the *training* split (never the
evaluation split); ``LDAProbe`` (solver ``lda``, ``lda.py``) is closed form from float64
sufficient statistics that sum across processes. ``ProbeBank`` (``bank.py``) holds one probe per
stage name and is what an experiment calls per batch; ``base.py`` holds what the solvers share,
``standardize.py`` the feature standardiser and ``io.py`` the on-disk format.
"""

from seglens.probes.bank import SOLVERS, ProbeBank, load_probe
from seglens.probes.lda import LDAProbe
from seglens.probes.sgd import LinearProbe
from seglens.probes.standardize import Standardizer

__all__ = ["SOLVERS", "LDAProbe", "LinearProbe", "ProbeBank", "Standardizer", "load_probe"]
