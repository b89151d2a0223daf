"""Starts and stops the local stack's real processes (redis-server, TorchServe, the server).

Used by ``make run`` and by the integration test fixtures, so both run the same
commands. Every process gets its own process group and is ended through it.
"""
