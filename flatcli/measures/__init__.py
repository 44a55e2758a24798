"""Measures: each a function returning an :class:`~flatcli.measures.estimate.Estimate`."""
