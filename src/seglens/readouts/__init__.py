"""Readouts beyond the trained probe: the logit lens, the embedding lens and sink tokens.

``classtokens`` maps class names to the model's own vocabulary, ``lens`` reads a stage's states
through the final norm and the class tokens' unembedding rows (or input embeddings), ``scoring``
scores both with the probe's confusion counts in the probing evaluation pass, and ``sinks`` flags
high-norm image tokens per stage.
"""
