"""Verifying a port: golden files, reading a candidate, per-tensor verdicts and their reports.

* :mod:`.golden`: the golden file (input, float64 oracle of every layer, bounds, weights);
* :mod:`.candidates`: what a port produced (a dump, or a model file run in its runtime);
* :mod:`.compare`: each tensor judged against its bound, accumulated and isolated; the first
  divergent layer and the precision the errors fit;
* :mod:`.report_html`: the self-contained HTML report and its charts, of one comparison or a set;
* :mod:`.dataset`: a folder of images or goldens, one task each on Dask's ``distributed``, folded
  into a per-layer summary.
"""
