"""The training engine: one loop for pre-training, prompt tuning and fine-tuning.

    from uniperceiver.config import load_recipe
    from uniperceiver.engine.trainer import train
    result = train(load_recipe("recipes/tiny.yaml"), resume="auto", progress=print)

Modules (import them directly; this package imports nothing so `import uniperceiver.engine` stays cheap):
    trainer           train(recipe, ...) -> TrainResult: builds each stage, runs the loop, final weights
    steps             the loop as named steps: run_loop -> train_step (micro_step x grad_accum,
                      optimizer_step with the NaN policy) -> after_step (log, progress, periodic eval,
                      SIGTERM, checkpoint); StepReport (progress); TrainingDiverged
    train_state       TrainState: everything the loop carries between steps, saved as one unit
    periodic_eval     evaluation every train.eval_every steps through the evaluation harness
    run_setup         run folder / resume decision, model and task construction, preflight checks
    optim             AdamW parameter groups (no decay on norms, biases, embeddings, ...), warm-up + decay
    sampler           stateless weighted task choice per (rank, draw); resumable per-task batch cursors
    loader            MultiTaskLoader: the deterministic plan of draws, MediaError skipping, workers
    targets           per-step target-set encoding with gradients (sharded across ranks)
    distributed       torchrun set-up, DDP / FSDP wrapping, the collectives of the loop
    train_checkpoint  checksummed, atomic step folders holding the TrainState and the trainables
    tuning            which parameters train (full / prompt tuning)
    runs              run folders, metrics.csv, TensorBoard, curves.png, finding runs and weights
"""
