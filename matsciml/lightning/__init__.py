"""Lightning integration: the data module and the training callbacks."""
