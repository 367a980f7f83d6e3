"""Remote models: the same graph runs where the model lives (a Ray actor), reached over HTTP with a token."""
