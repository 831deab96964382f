"""One job: loading, data, the trainer, evaluation, checkpoints and resume, the teacher cache, make-data."""
