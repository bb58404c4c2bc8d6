"""The bottom layer: plain values and names every other layer passes around.

Nothing here imports Ray, MLflow, Optuna or torch at module level, so the commands that
only read (``status``, ``validate``) stay light.
"""
