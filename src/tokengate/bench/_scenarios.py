"""The registry of scenarios, in the order they run and print.

To add a scenario: write ``_bN_name.py`` with one function per system and a ``SCENARIO``
(see ``_b1_overhead.py``), then add it to the tuple below.
"""

from __future__ import annotations

from tokengate.bench import _b1_overhead, _b4_flood, _b6_mixed, _b7_nested
from tokengate.bench._model import Scenario

__all__ = ["SCENARIOS", "get_scenario"]

SCENARIOS: dict[str, Scenario] = {
    s.id: s
    for s in (
        _b1_overhead.SCENARIO,
        _b4_flood.SCENARIO,
        _b6_mixed.SCENARIO,
        _b7_nested.SCENARIO,
    )
}


def get_scenario(scenario_id: str) -> Scenario:
    try:
        return SCENARIOS[scenario_id.upper()]
    except KeyError:
        known = ", ".join(SCENARIOS)
        raise KeyError(f"no scenario {scenario_id!r}; known: {known}") from None
