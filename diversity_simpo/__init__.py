"""The machinery behind the two entry points (`train_diversity_simpo.py`, the CLI; `diversity_simpo_trainer.py`, the
loss): settings and their checks, data, layouts, the fused head, the eval, and what a run leaves beside its model.
Nothing here imports the entry points; they import from here.
"""
