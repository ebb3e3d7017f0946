"""DepthVLM-Bench evaluation: metrics (pure numpy), benchmark data, reports.

``metrics`` scores arrays, ``bench_data`` reads datasets, records, ground truth and saved
predictions, ``report`` writes JSON, Markdown and plots; ``depthvlm eval``
(:mod:`depthvlm_ros.tools.eval_tool`) puts them together.
"""
