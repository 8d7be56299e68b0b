"""The embedded default model: its data set (Animal-MNIST), training script and class-fidelity classifier."""
