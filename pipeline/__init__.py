"""A small stage-DAG engine over submitit. It knows nothing about video or speech."""
