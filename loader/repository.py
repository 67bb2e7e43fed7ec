"""The model repository on disk: ``<root>/<name>/<version>/model.json`` plus the model file.

Every path is resolved and must stay inside the root: a name with ``..`` is refused by the
name check, and a symlink that leads out of the root is refused here. The repository is
read on demand with a per-file modification-time cache, so versions added or removed on
disk are seen on the next lookup.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from common.errors import (
    ConfigError,
    InferenceError,
    InvalidNameError,
    UnknownModelError,
    describe_validation_error,
)
from loader.spec import ModelConfig, ModelFormat, ModelSpec, check_name, check_version

SPEC_FILE = "model.json"

logger = logging.getLogger(__name__)


def version_sort_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order: v2 < v10, 1.9 < 1.10."""
    parts = re.split(r"(\d+)", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p)


class ModelRepository:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[int, Any]] = {}

    def _confined(self, path: Path, what: str) -> Path:
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise InvalidNameError(f"{what} resolves outside the model repository ({self.root})")
        return resolved

    def model_dir(self, name: str) -> Path:
        check_name(name)
        path = self._confined(self.root / name, f"model {name!r}")
        if not path.is_dir():
            raise UnknownModelError(
                f"unknown model {name!r}; models in the repository: "
                f"{', '.join(self.list_models()) or 'none'}"
            )
        return path

    def version_dir(self, name: str, version: str) -> Path:
        check_version(version)
        model_dir = self.model_dir(name)
        path = self._confined(model_dir / version, f"model {name!r} version {version!r}")
        if not (path / SPEC_FILE).is_file():
            raise UnknownModelError(
                f"model {name!r} has no version {version!r}; versions: "
                f"{', '.join(self.versions(name)) or 'none'}"
            )
        return path

    def list_models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        names = []
        for entry in sorted(self.root.iterdir()):
            try:
                check_name(entry.name)
                self._confined(entry, entry.name)
            except InvalidNameError:
                continue
            if entry.is_dir() and self._version_names(entry):
                names.append(entry.name)
        return names

    def _version_names(self, model_dir: Path) -> list[str]:
        found = []
        for entry in model_dir.iterdir():
            try:
                check_version(entry.name)
                self._confined(entry, entry.name)
            except InvalidNameError:
                continue
            if (entry / SPEC_FILE).is_file():
                found.append(entry.name)
        return sorted(found, key=version_sort_key)

    def versions(self, name: str) -> list[str]:
        return self._version_names(self.model_dir(name))

    def _read_json(self, path: Path, parse: Any) -> Any:
        """Parse a JSON config, cached until the file's modification time changes."""
        mtime = path.stat().st_mtime_ns
        with self._lock:
            cached = self._cache.get(path)
            if cached is not None and cached[0] == mtime:
                return cached[1]
        where = path.relative_to(self.root)
        try:
            value = parse(json.loads(path.read_text()))
        except ValidationError as exc:
            raise ConfigError(f"{where}: {describe_validation_error(exc)}") from None
        except ValueError as exc:
            raise ConfigError(f"{where}: not valid JSON: {exc}") from None
        with self._lock:
            self._cache[path] = (mtime, value)
        return value

    def formats(self) -> set[ModelFormat]:
        """The formats of the repository's versions (unreadable specs left out)."""
        found = set()
        for name in self.list_models():
            for version in self.versions(name):
                with contextlib.suppress(InferenceError):
                    found.add(self.spec(name, version).format)
        return found

    def spec(self, name: str, version: str) -> ModelSpec:
        path = self.version_dir(name, version) / SPEC_FILE
        return self._read_json(path, ModelSpec.model_validate)

    def model_config(self, name: str) -> ModelConfig:
        path = self.model_dir(name) / SPEC_FILE
        if not path.is_file():
            return ModelConfig()
        return self._read_json(path, ModelConfig.model_validate)

    def model_file(self, name: str, version: str, spec: ModelSpec) -> Path:
        folder = self.version_dir(name, version)
        return self._confined(folder / spec.file, f"model file of {name}/{version}")

    def default_version(self, name: str) -> str:
        versions = self.versions(name)
        if not versions:
            raise UnknownModelError(f"model {name!r} has no versions")
        configured = self.model_config(name).default_version
        if configured is None:
            return versions[-1]
        if configured not in versions:
            raise ConfigError(
                f"{name}/model.json: default_version={configured!r} is not one of {versions}"
            )
        return configured

    def registry_entry(self, name: str) -> dict[str, Any]:
        """What producers need to route and validate a request, as JSON-ready data."""
        config = self.model_config(name)
        versions = {}
        for version in self.versions(name):
            spec = self.spec(name, version)
            try:
                size = self.model_file(name, version, spec).stat().st_size
            except OSError:
                size = 0
            versions[version] = {
                "format": spec.format.value,
                "bytes": size,
                "input": spec.input.model_dump(mode="json"),
                "scaling": spec.scaling,
            }
        return {
            "name": name,
            "default_version": self.default_version(name),
            "traffic": config.traffic,
            "versions": versions,
        }

    def registry(self) -> dict[str, dict[str, Any]]:
        """Entries of every model that can be read; a broken config is left out, not fatal."""
        entries = {}
        for name in self.list_models():
            try:
                entries[name] = self.registry_entry(name)
            except (ConfigError, UnknownModelError, OSError) as exc:
                logger.warning("model %s left out of the registry: %s", name, exc)
        return entries
