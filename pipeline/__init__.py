"""dna-pipeline: DNA (blockwisely supervised NAS with knowledge distillation) as a DVC + MLflow pipeline."""
