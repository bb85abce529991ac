"""The training engine: one loop for pre-training, prompt tuning and fine-tuning.

    from uniperceiver.config import load_recipe
    from uniperceiver.engine.trainer import train
    result = train(load_recipe("recipes/tiny.yaml"), resume="auto", progress=print)

Modules (import them directly; this package imports nothing so `import uniperceiver.engine` stays cheap):
    trainer       train(recipe, ...) -> TrainResult; StepReport (progress); TrainingDiverged
    setup         run folder / resume decision, model and task construction, preflight checks
    optim         AdamW parameter groups (no decay on norms, biases, embeddings, ...), warm-up + decay
    sampler       stateless weighted task choice per (rank, draw); resumable per-task batch cursors
    loader        MultiTaskLoader: the deterministic plan of draws, MediaError skipping, workers
    targets       per-step target-set encoding with gradients (sharded across ranks)
    distributed   torchrun set-up, DDP wrapping, differentiable all-gather
    checkpoint    checksummed, atomic step folders; corrupt-checkpoint fallback; RNG states
    tuning        which parameters train (full / prompt tuning)
    runs          run folders, metrics.csv, TensorBoard, curves.png, finding runs and weights
"""
