"""One module per model family: its adapter, its seeded tiny builder and its registration.

``seglens.models.registry`` imports every module here and registers each ``ModelFamily``
subclass a module defines under its ``model_types`` and ``tiny_models``; adding a family is adding
one module (plus its tests).
"""
