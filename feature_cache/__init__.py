"""Market-data features: the one schema, the Redis record writer and reader."""
