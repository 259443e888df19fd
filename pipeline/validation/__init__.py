"""Running models and judging them: runners, drift metrics, per-layer error, budgets, reports, diff, sweep,
and parity with other runtimes (a device, MediaPipe's ImageClassifier).

May import: every earlier stage (``core``, ``tflite``, ``model``, ``conversion``).
"""
