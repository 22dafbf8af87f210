"""A run's files: its directory (local or a pyarrow URI), the claim on it, how it starts or resumes,
checkpoints, the saved model, metrics, TensorBoard events and plots."""
