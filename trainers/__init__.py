"""rlseg trainers: plain PyTorch (data, models, RL pieces, methods, the per-worker train loop).

Never imports ray.tune, optuna or mlflow; `trainers.loop.train_worker` is the one place that touches ray.train.
"""
