"""Speed and size of our models beside torchvision's, measured in one run on one machine.

``tools/benchmark.py`` is the door; :func:`tasks.benchmarking.suite.run_suite` runs the sections:

* :mod:`~tasks.benchmarking.speed`: inference latency and throughput, ours and torchvision's,
  torchvision's both as shipped and with our inference treatment;
* :mod:`~tasks.benchmarking.training_speed`: training steps and the data pipeline;
* :mod:`~tasks.benchmarking.evaluation_speed`: COCO mAP and mIoU evaluation;
* :mod:`~tasks.benchmarking.convergence`: a synthetic config trained from scratch;
* :mod:`~tasks.benchmarking.report`: the Markdown report, ratios first.
"""
