"""DepthVLM-Bench evaluation: metrics (pure numpy), benchmark data, reports.

``metrics`` scores arrays, ``benchmark_data`` reads datasets, records, ground truth and saved
predictions, ``report`` writes JSON, Markdown and plots, ``evaluator`` runs a model or saved predictions
over a dataset (cached per image), ``qa`` scores spatial answers; ``depthvlm eval``
(:mod:`depthvlm_ros.tools.eval_tool`) parses the arguments and calls them.
"""
