"""The ``prompts`` stage's wing: requests of 1-2 classes -> scene descriptions and their
counterfactual twins. The stage is :func:`magicseg.prompts.stage.run_prompts`; writers are
picked by name from :data:`magicseg.prompts.stage.WRITERS`.

This ``__init__`` imports nothing, so a module that needs one piece (``generate`` checks that a
prompt mentions its class with :mod:`magicseg.prompts.counterfactual`) does not load the LLM
writers.
"""
