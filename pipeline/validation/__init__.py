"""Running models and judging them: runners, drift metrics, per-layer error, budgets, reports, diff, sweep.

May import: every earlier stage (``core``, ``tflite``, ``model``, ``conversion``).
"""
