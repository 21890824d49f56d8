"""``tokengate info``: the Quick-Proof's initialisation banner for this machine, without
starting."""

from __future__ import annotations

import importlib.util
import platform

import tokengate
from tokengate import OperationsCoordinator
from tokengate._affinity import mapping_banner
from tokengate._topology import gil_enabled
from tokengate.cli._demo import accepts_backend

__all__ = ["features", "gil_enabled", "info_text"]


def features() -> dict[str, bool]:
    """Optional parts of this build and this environment."""
    return {
        "live display (rich)": importlib.util.find_spec("rich") is not None,
        "trace export (--trace)": hasattr(OperationsCoordinator, "export_trace"),
        "Prometheus metrics (--metrics-port)": hasattr(OperationsCoordinator, "serve_metrics")
        and importlib.util.find_spec("prometheus_client") is not None,
        "Dask backend (--backend dask)": accepts_backend()
        and importlib.util.find_spec("distributed") is not None,
    }


def info_text() -> str:
    coordinator = OperationsCoordinator()  # not started: no thread, no worker
    config = coordinator.config
    rule = "=" * 70
    gil = "on" if gil_enabled() else "off"
    lines = [
        rule,
        f"tokengate {tokengate.__version__} on {platform.python_implementation()} "
        f"{platform.python_version()} (GIL {gil}), {platform.system()} {platform.machine()}",
        rule,
        "",
        coordinator.topology.banner(),
        "",
        coordinator.affinity.banner(),
        "",
        mapping_banner(coordinator.core_count, config.workers_per_core),
        f"  Mailbox max: {config.mailbox_max} tokens per worker (admission: {config.admission})",
        "",
        "[STORAGE_THROTTLE] Initialized with speed tiers:",
        *(f"  {tier}: {limit} concurrent I/O" for tier, limit in config.storage_limits.items()),
        "",
        f"GIL enabled: {gil_enabled()}",
        "",
        "Optional parts:",
        *(f"  {name}: {'yes' if ok else 'no'}" for name, ok in features().items()),
    ]
    return "\n".join(lines)
