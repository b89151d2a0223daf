"""The audit trail: a local journal written before each response, shipped to SQL after."""
