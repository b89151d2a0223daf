"""Checks of real data and of the models, run by hand against recordings and the local
stack: ``make acceptance``, ``make drift-report``, ``make quality-report``."""
