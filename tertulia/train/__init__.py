"""Making the assistant yours: training data, fine-tuning, training from scratch."""
