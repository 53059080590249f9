"""Model control: changing which model versions serve while the server runs, in the three
modes of Triton's `--model-control-mode` (the `model_control` setting).

- none: the repository is read once, at start; load and unload requests are refused.
- poll: every `repository_poll_s` the repository is scanned again: a new version folder loads,
  a removed one unloads, one whose files changed (name, size or mtime of a file in it) reloads.
  Load and unload requests are refused, as Triton does.
- explicit: only load and unload requests change what serves (HTTP
  `POST /v2/repository/models/{name}/load|unload`, gRPC `RepositoryModelLoad|Unload`). A load
  loads every version folder of the model and reloads those already serving; versions whose
  folder is gone unload. An unload unloads every version.

Start-up is the same in every mode (`Repository.load_all`). What each change guarantees:
- A version loads through `Repository.try_load`: the same checks as at start (manifest, sha256,
  graph, kernel set), in a worker thread while the other versions keep serving.
- A reload builds the new version beside the old one and swaps them in one step of the event
  loop. If the new files are refused, the old version keeps serving and the index says why.
- A version that stops serving (unloaded, removed or replaced) takes no new request at once and
  lets every request already admitted for it finish (`Batcher.drain`, at most
  `Settings.grace_s()`) before it closes.
- Changes run one at a time; metrics (`notsure_model_info`, `notsure_model_ready`,
  `notsure_threshold` and the monitor's gauges) follow each one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from service.config import Settings
from service.errors import (
    ControlDisabled,
    InvalidInput,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
)
from service.monitor import Monitor
from service.repository import ModelVersion, Repository, State, fingerprint, scan
from service.runner import LoadedModel

log = logging.getLogger(__name__)
Action = Literal["load", "unload"]
# Parameters a request may carry (Triton's); a load takes none: it reads the version folders.
PARAMETERS: dict[Action, frozenset[str]] = {
    "load": frozenset(),
    "unload": frozenset({"unload_dependents"}),  # notsure models have no dependents
}


@dataclass(frozen=True)
class IndexEntry:
    """One model version in the repository index, as Triton answers it."""

    name: str
    version: str
    state: State
    reason: str


def check_parameters(action: Action, params: Mapping[str, Any]) -> None:
    """InvalidInput for a request parameter this server does not take (e.g. a load's `config`
    or `file:` overrides: a version serves only its folder's verified files)."""
    for key in params:
        if key not in PARAMETERS[action]:
            raise InvalidInput(
                f"the {action} parameter {key!r} is not supported",
                field=f"parameters.{key}",
                fix="omit it: a model loads from its version folders' own files"
                if action == "load"
                else "omit it",
            )


class ModelControl:
    """Loads, unloads and reloads model versions of a running server, and lists them."""

    def __init__(self, settings: Settings, repository: Repository, monitor: Monitor) -> None:
        self.settings, self.repository, self.monitor = settings, repository, monitor
        self._lock = asyncio.Lock()  # one change at a time
        self._task: asyncio.Task[None] | None = None
        self._changes: set[asyncio.Task[None]] = set()  # requested loads and unloads under way

    def start(self) -> None:
        """Start polling the repository, in poll mode (after `load_all`)."""
        if self.settings.model_control == "poll":
            self._task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def close(self) -> None:
        """Stop polling; let requested changes under way finish."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._changes, return_exceptions=True)

    async def _whole(self, change: Coroutine[Any, Any, None]) -> None:
        """Run a requested change to its end even if the request is cancelled (a gRPC client's
        deadline): a change stopped half-way would leave a replaced version undrained."""
        task = asyncio.get_running_loop().create_task(change)
        self._changes.add(task)
        task.add_done_callback(self._done)
        await asyncio.shield(task)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._changes.discard(task)
        if not task.cancelled():
            task.exception()  # marked read: its requester answers it, or is gone (the log has it)

    # -- the repository API -----------------------------------------------------------------------

    async def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every version served or found on disk (those never loaded: UNAVAILABLE), sorted."""
        on_disk = await asyncio.to_thread(self._scan)
        entries = {
            (f.name, f.version): IndexEntry(f.name, str(f.version), f.state, f.reason)
            for f in self.repository.all()
        }
        for name, version, _ in on_disk:
            entries.setdefault(
                (name, version), IndexEntry(name, str(version), "UNAVAILABLE", "not loaded")
            )
        out = [entries[key] for key in sorted(entries)]
        return [e for e in out if e.state == "READY"] if ready_only else out

    async def load(self, name: str) -> None:
        """Load every version folder of the model, reloading those that serve; unload its
        versions whose folder is gone. ModelLoadFailed names the versions refused."""
        self._allowed("load")
        await self._whole(self._load(name))

    async def _load(self, name: str) -> None:
        async with self._lock:
            on_disk = {
                v: path for n, v, path in await asyncio.to_thread(scan, self._root) if n == name
            }
            known = self.repository.versions.get(name, {})
            if not on_disk and not known:
                raise self._not_found(name)
            for version in sorted(set(known) - set(on_disk)):
                await self._unload(known[version], remove=True)
            refused = []
            for version, path in sorted(on_disk.items()):
                found = await self._load_version(name, version, path, always=True)
                if found.error:
                    refused.append(f"version {version}: {found.error}")
        if refused:
            raise ModelLoadFailed(
                f"model {name!r}: {'; '.join(refused)}",
                field="model_name",
                fix="fix or remove the refused version folders and load again; the repository "
                "index lists the state of every version",
            )

    async def unload(self, name: str) -> None:
        """Unload every version of the model (requests in flight finish first)."""
        self._allowed("unload")
        await self._whole(self._unload_model(name))

    async def _unload_model(self, name: str) -> None:
        async with self._lock:
            known = self.repository.versions.get(name)
            if not known:
                on_disk = await asyncio.to_thread(scan, self._root)
                if not any(n == name for n, _, _ in on_disk):
                    raise self._not_found(name)
                return  # in the repository, never loaded: nothing to do
            for found in list(known.values()):
                await self._unload(found, remove=False)

    async def poll(self) -> None:
        """Bring what serves in line with the repository's folders (poll mode, or a test)."""
        async with self._lock:
            on_disk = {(n, v): path for n, v, path in await asyncio.to_thread(self._scan)}
            for found in self.repository.all():
                if (found.name, found.version) not in on_disk:
                    await self._unload(found, remove=True)
            for (name, version), path in sorted(on_disk.items()):
                await self._load_version(name, version, path, always=False)

    # -- one version --------------------------------------------------------------------------

    async def _load_version(
        self, name: str, version: int, path: Path, *, always: bool
    ) -> ModelVersion:
        """Load (or reload) one version; unless `always`, only when its files changed since
        the last try. The version's entry afterwards."""
        versions = self.repository.versions.setdefault(name, {})
        files = await asyncio.to_thread(fingerprint, path)
        found = versions.get(version)
        if found is None:
            found = versions[version] = ModelVersion(name, version, path, late=True)
        elif files == found.files and not always:
            return found
        found.files, found.unloaded = files, False
        candidate = ModelVersion(name, version, path)
        if found.loaded is None:
            found.change, found.error = "LOADING", None
        try:
            new = await asyncio.to_thread(self.repository.try_load, candidate)
        finally:
            found.change = None
        if new is None:
            if found.loaded is None:
                found.manifest, found.error = candidate.manifest, candidate.error
                self.repository.publish(found)  # notsure_model_ready 0
            else:
                found.error = (
                    f"new files refused, still serving the earlier ones: {candidate.error}"
                )
            return found
        old = found.loaded
        found.loaded, found.manifest, found.error = new, candidate.manifest, None
        if old is not None:
            self.repository.retract(old)
        self.repository.publish(found)
        self.monitor.watch(new)
        if old is not None:
            log.info("model %s version %d reloaded; the earlier one drains", name, version)
            await self._retire(old, "was replaced by a reload")
        return found

    async def _unload(self, found: ModelVersion, *, remove: bool) -> None:
        """Stop serving a version: no new request reaches it, those admitted finish. `remove`:
        its folder is gone, so it leaves the index too."""
        old, labels = found.loaded, (found.name, str(found.version))
        found.loaded, found.error = None, None
        self.repository.metrics.model_ready.remove(*labels)
        if old is not None:
            self.repository.retract(old)
            found.change = "UNLOADING"
            try:
                await self._retire(old, "was unloaded")
            finally:
                found.change = None
            self.monitor.forget(found.name, found.version)
            log.info("model %s version %d unloaded", found.name, found.version)
        if remove:
            versions = self.repository.versions[found.name]
            del versions[found.version]
            if not versions:
                del self.repository.versions[found.name]
        else:
            found.unloaded = True

    async def _retire(self, old: LoadedModel, what: str) -> None:
        refusal = ModelNotReady(
            f"model {old.name!r} version {old.version} {what}",
            fix="send the request again: it goes to the version that serves now",
        )
        await old.batcher.drain(refusal, self.settings.grace_s())

    # -- helpers ------------------------------------------------------------------------------

    @property
    def _root(self) -> Path:
        return self.settings.model_repository

    def _scan(self) -> list[tuple[str, int, Path]]:
        """The version folders this mode serves from: all of them with explicit control (any
        model may be loaded), else those of the `models` setting (all when empty)."""
        names = set(self.settings.models) if self.settings.model_control != "explicit" else set()
        return [s for s in scan(self._root) if not names or s[0] in names]

    def _allowed(self, action: Action) -> None:
        mode = self.settings.model_control
        if mode == "explicit":
            return
        how = (
            f"it rescans the repository every {self.settings.repository_poll_s:g} s"
            if mode == "poll"
            else "it loads the repository once, at start"
        )
        raise ControlDisabled(
            f"model {action} requests are refused: this server runs with model_control={mode} "
            f"({how})",
            field="model_control",
            fix="start it with NOTSURE_MODEL_CONTROL=explicit to load and unload models "
            "through the API",
        )

    def _not_found(self, name: str) -> ModelNotFound:
        names = sorted({n for n, _, _ in scan(self._root)})
        return ModelNotFound(
            f"no model named {name!r} in the repository",
            field="model_name",
            fix=f"use one of: {', '.join(names) or 'none'}",
        )

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.poll()
            except Exception:  # a bad folder must not stop the polling
                log.exception("repository poll failed")
