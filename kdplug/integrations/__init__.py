"""Integrations with training frameworks (each imports its framework only when used).

- :mod:`kdplug.integrations.hf`: ``DistillationTrainer``, a ``transformers.Trainer`` subclass.
"""
