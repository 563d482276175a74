"""genkit.diffusion: EDM teachers (Karras et al. 2022) that ``distill`` and ``sample`` use as denoisers.

- ``networks.py``: the raw UNet ``F(c_in x, c_noise, class_labels=None)`` and its ``UNetConfig``;
- ``loss.py``: ``EDMLoss`` (log-normal sigmas, lambda(sigma) weighting);
- ``train.py``: the ``genkit train-diffusion`` recipe and loop, ``generate`` (sampling a teacher);
- ``io.py``: the teacher folder format, ``EDMTeacher`` (preconditioning + classifier-free guidance) and
  ``load_edm_teacher(path)``.
"""
