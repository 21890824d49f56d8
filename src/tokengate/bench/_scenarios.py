"""The registry of scenarios, in the order they run and print.

To add a scenario: write ``_bN_name.py`` with one function per system and a ``SCENARIO``
(see ``_b1_overhead.py``), then add it to the tuple below.
"""

from __future__ import annotations

from tokengate.bench import (
    _b1_overhead,
    _b2_scaling,
    _b3_isolation,
    _b4_flood,
    _b5_io,
    _b6_mixed,
    _b7_nested,
    _b8_data,
    _dash_overhead,
    _obs_overhead,
)
from tokengate.bench._model import Scenario

__all__ = ["SCENARIOS", "get_scenario"]

SCENARIOS: dict[str, Scenario] = {
    s.id: s
    for s in (
        _b1_overhead.SCENARIO,
        _b2_scaling.SCENARIO,
        _b2_scaling.SCENARIO_OVERHEAD,
        _b3_isolation.SCENARIO,
        _b4_flood.SCENARIO,
        _b5_io.SCENARIO_B5,
        _b5_io.SCENARIO_B5B,
        _b6_mixed.SCENARIO,
        _b7_nested.SCENARIO,
        _b8_data.SCENARIO_DISTINCT,
        _b8_data.SCENARIO_BROADCAST,
        _b5_io.SCENARIO_SURGE,
        _obs_overhead.SCENARIO,
        _obs_overhead.SCENARIO_LOG,
        _dash_overhead.SCENARIO,
        _dash_overhead.SCENARIO_B6,
    )
}


def get_scenario(scenario_id: str) -> Scenario:
    """The scenario with this id, in any case (``b5b`` is ``B5b``)."""
    for sid, scenario in SCENARIOS.items():
        if sid.upper() == scenario_id.strip().upper():
            return scenario
    known = ", ".join(SCENARIOS)
    raise KeyError(f"no scenario {scenario_id!r}; known: {known}")
