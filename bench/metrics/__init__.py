"""The built-in metrics, one plugin per module (the API: bench/metric.py):

- ``accuracy``: C-ACC, ASR, RA and DER from the model's predictions (docs/protocol.md, "Metrics");
- ``detection``: precision, recall and FPR of the samples a defense flags, against ground truth;
- ``selection``: did a unit-selecting defense hit the backdoor's units (an evaluation-only
  oracle), against a chance baseline of as many random units;
- ``reasr``: REASR by trigger inversion, the natural-backdoor metric;
- ``features``: penultimate features of test images, which the report's t-SNE draws (no column).

A metric from outside the project is one file with a ``@register_metric`` class
(docs/examples/margin.py); it appears in ``results`` and in the report with no other edit.
"""
