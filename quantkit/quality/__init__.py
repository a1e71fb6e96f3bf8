"""Quality: the measures, the bf16 reference, scorers that run each format's real engine, evaluation and its gate,
verification, and the language-drift check."""
