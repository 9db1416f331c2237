"""Typed settings of a search and of a retraining, built once from a config at the program's
edge: the one home of every default, free of JAX.

A config file (``configs/cifar.py``) is an ``ml_collections.ConfigDict`` with one section per
dataclass here; ``SearchSettings.from_config(config)`` turns it into frozen dataclasses, and
nothing below the entry points reads a ConfigDict. Every default lives here, in the
dataclass: a field a config (or a workdir stored by an older version) does not set takes
its default, and a field the dataclass does not know is refused by name. Ranges are checked
on construction, so a bad value fails before anything is stored or trained.

One job per module: ``base`` (errors, checks, building from a config, comparing with a
stored one), ``agent`` (the agent, its ε schedule and the confirm rule), ``search`` (the
search's sections, the reward and ``SearchSettings``), ``final`` (``FinalSettings``). Import
each name from its module.
"""
