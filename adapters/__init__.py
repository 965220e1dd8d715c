"""Projection adapters between token spaces."""
