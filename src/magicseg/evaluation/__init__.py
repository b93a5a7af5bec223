"""The ``evaluate`` stage's wing: a segmenter (the trained checkpoint or the Grounded-SAM
baseline, one interface: :mod:`magicseg.evaluation.segmenters`) scored on the procedural test
set (:mod:`~magicseg.evaluation.procedural`) and on the enabled real datasets
(:mod:`~magicseg.evaluation.real`, readers in :mod:`~magicseg.evaluation.datasets`), every
test set reported the same way (:mod:`~magicseg.evaluation.report`) with galleries drawn by
:mod:`magicseg.viz`.

Its entry is :func:`magicseg.evaluation.stage.run_evaluate`. This file imports nothing, so the
pre-flight reads the datasets' layouts (:mod:`~magicseg.evaluation.datasets`) without loading
the scoring code.
"""
