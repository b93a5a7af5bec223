"""The shared core every stage runs: params (``config``), errors, files between stages
(``io``), named random streams (``seeding``), backend registries, vocabularies and the
procedural catalogue they name, device resolution (``devices``) and the stage-script helpers
(``stage``).

Nothing here imports a model, a trainer or a backend, and this ``__init__`` imports nothing,
so importing one core module loads only what it needs. Every stage lists ``src/magicseg/core``
as a DVC dependency.
"""
