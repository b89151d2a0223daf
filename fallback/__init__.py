"""The fallback ladder after the model: cached score, rules baseline, abstain."""
