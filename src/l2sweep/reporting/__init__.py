"""Reporting: pure summaries of training histories, the report text and the figures."""
