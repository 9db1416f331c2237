"""Typed settings of a search and of a retraining, built once from a config at the program's
edge: the one home of every default, free of JAX.

A config file (``configs/cifar.py``) is an ``ml_collections.ConfigDict`` with one section per
dataclass here; ``SearchSettings.from_config(config)`` turns it into frozen dataclasses, and
nothing below the entry points reads a ConfigDict. Every default lives here, in the
dataclass: a field a config (or a workdir stored by an older version) does not set takes
its default, and a field the dataclass does not know is refused by name. Ranges are checked
on construction, so a bad value fails before anything is stored or trained.

One job per module: ``base`` (errors, checks, building from a config, comparing with a
stored one), ``agent`` (the agent and its ε schedule), ``search`` (the search's sections and
``SearchSettings``), ``final`` (``FinalSettings``). The names below are the package's
interface.
"""

from blockqnn_jax.settings.base import (COMPUTE_DTYPES, ConfigMismatch, DATA_SOURCES,
                                        EXECUTOR_KINDS, FromConfig, PRNG_IMPLS, SettingsError,
                                        TRAIN_LOOPS, build, differences, flatten, refuse_changes)
from blockqnn_jax.settings.agent import (AgentSettings, EXPLORATIONS, EpsilonSchedule, FAST_AGENT,
                                         FAST_CONFIRM,
                                         FAST_SCHEDULE, PAPER_EPSILON_SCHEDULE, QLearningConfig,
                                         SCHEDULE_UNITS, STRATEGIES)
from blockqnn_jax.settings.search import (DataSettings, ExecutorSettings, LoopSettings,
                                          NetworkSettings, RaySettings, SearchSettings, TrainConfig)
from blockqnn_jax.settings.final import (FinalDataSettings, FinalNetworkSettings, FinalSettings,
                                         FinalTrainConfig)

__all__ = [
    'AgentSettings', 'COMPUTE_DTYPES', 'ConfigMismatch', 'DATA_SOURCES', 'DataSettings',
    'EXECUTOR_KINDS', 'EXPLORATIONS', 'EpsilonSchedule', 'ExecutorSettings', 'FAST_AGENT',
    'FAST_CONFIRM',
    'FAST_SCHEDULE', 'FinalDataSettings', 'FinalNetworkSettings', 'FinalSettings',
    'FinalTrainConfig', 'FromConfig', 'LoopSettings', 'NetworkSettings', 'PAPER_EPSILON_SCHEDULE',
    'PRNG_IMPLS', 'QLearningConfig', 'RaySettings', 'SCHEDULE_UNITS', 'STRATEGIES',
    'SearchSettings', 'SettingsError', 'TRAIN_LOOPS', 'TrainConfig', 'build', 'differences',
    'flatten', 'refuse_changes',
]
