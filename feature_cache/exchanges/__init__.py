"""Readers of recorded exchange data: Binance and Kraken websocket recordings and the
vendors' historical L2 CSV files, with their sequence checks (``sources`` lists them)."""
