"""The analysis side of Precedent: Celery tasks, decoding, models, Grad-CAM, results.

Empty until the analysis issue lands; the network side (``node``) never imports it.
"""
