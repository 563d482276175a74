"""genkit.distill: one-step generators by Score identity Distillation.

- ``sid.py``: the losses (SiD fake-score and generator losses, SiDA's discriminator/adversarial terms,
  SiD-LSG guidance) as one callable object, :class:`SiDLoss`;
- ``nets.py``: the common network signature, the one-step generator, MLP denoisers for mixture teachers;
- ``teachers.py``: teacher path -> networks and conditioning; generator folders (:func:`load_generator`);
- ``text.py``: offline MiniLM text conditioning;
- ``train.py``: the recipe and the training loop of ``genkit distill``.
"""

from genkit.distill.sid import SiDLoss, generator_sigmas, guided, sid_generator_objective
from genkit.distill.teachers import load_generator

METHODS = ("sid", "sida", "sid-lsg")

__all__ = ["METHODS", "SiDLoss", "generator_sigmas", "guided", "load_generator", "sid_generator_objective"]
