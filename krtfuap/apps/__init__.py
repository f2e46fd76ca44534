"""Applications built on the krtfuap algorithm: the ``krtfuap`` command line, the demo, the benchmark.

Nothing here is imported by ``import krtfuap``: research code that uses the
attack, its parts, the metrics and the models never loads the applications'
world (matplotlib, the ONNX detector runtime, the command line). Their extra
dependencies install with ``pip install "krtfuap[apps]"``.

* :mod:`krtfuap.apps.cli`: the ``krtfuap`` command (``python -m krtfuap``);
* :mod:`krtfuap.apps.cloak`: :class:`~krtfuap.apps.cloak.PhotoCloak`, ``krtfuap cloak``: cloak real photos;
* :mod:`krtfuap.apps.demo`: ``krtfuap demo``, the end-to-end run on real faces;
* :mod:`krtfuap.apps.benchmark`: ``krtfuap benchmark``, the paper's experiments;
* :mod:`krtfuap.apps.report`: the benchmark's ``results.csv``, ``report.md`` and figures.
"""
