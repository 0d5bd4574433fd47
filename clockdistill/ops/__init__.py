"""Box operations shared by the models, losses and evaluation."""
