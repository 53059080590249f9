"""The state one server process builds at start-up and every transport shares (HTTP, gRPC)."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.batch_plan import ArrivalTracker
from service.config import Settings
from service.metrics import Metrics
from service.model_control import ModelControl
from service.monitor import Monitor
from service.recent import RecentDecisions
from service.repository import Repository
from service.security import KeyRing
from service.tracing import Tracing


@dataclass
class AppState:
    """Everything the lifespan builds; the HTTP app keeps it on app.state.notsure."""

    settings: Settings
    metrics: Metrics
    repository: Repository
    control: ModelControl  # loads and unloads versions while the server runs
    keys: KeyRing
    arrivals: ArrivalTracker
    monitor: Monitor
    tracing: Tracing | None = None  # the `tracing` setting's spans
    draining: bool = False
    # The last decisions of each model, for the page's live panel (this process only).
    recent: RecentDecisions = field(default_factory=RecentDecisions)
