"""Evaluation: one harness for every checkpoint and task, and the library call the command line uses.

Modules (import them directly; this package imports nothing, so importing it stays cheap):
    api           evaluate_checkpoint(checkpoint, task, ...) -> EvalResult: resolve, load, build, evaluate
    harness       evaluate_task(model, task, ...) -> EvalResult: batches, sharding, skipped media, metrics
    checkpoints   which weights a path means (model folder, step folder, run folder, newest pre-training run)
    target_cache  encoded target sets kept in memory and on disk, keyed by weights and targets
"""
