"""Kedro datasets for bird-bone's artifacts. Every save is atomic (temp name, then rename),
and models never pass through Kedro's memory dataset (which would deep-copy them).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from kedro.io import AbstractDataset, DatasetError
from safetensors.torch import load_file, save_file

from birdbone import runstate
from birdbone.core import generate, modeling, waves
from birdbone.core.io import (
    OWNER_FILE,
    OWNER_MARK,
    TMP_PREFIX,
    atomic_dir,
    atomic_path,
    sha256_file,
    sha256_json,
    write_bytes_atomic,
    write_json_atomic,
)
from birdbone.core.lowrank import ADAPTER_DIR, load_adapter, save_adapter
from birdbone.core.masks import MaskSet
from birdbone.core.quantize import QUANT_FILE, QuantTable

SIDECAR = OWNER_FILE  # a model's sidecar is the mark of a folder bird-bone wrote
MASKS = "masks.safetensors"


def write_sidecar(directory: Path, origin: dict[str, Any]) -> None:
    """``birdbone.json``: how the model was made, and the SHA-256 of each weight file."""
    hashes = {p.name: sha256_file(p) for p in sorted(directory.glob("model*.safetensors"))}
    write_json_atomic(directory / SIDECAR, {"origin": origin, "sha256": hashes, **OWNER_MARK})


def weights_digest(bundle: modeling.ModelBundle) -> str:
    """What names a model's weights: the hash of its sidecar's file hashes where it was read
    from a folder bird-bone wrote (no second pass over the weights), else the hash of the
    weights themselves (``generate.model_digest``)."""
    sidecar = Path(bundle.path) / SIDECAR if bundle.path else None
    if sidecar is not None and sidecar.is_file():
        return sha256_json(json.loads(sidecar.read_text()).get("sha256"))
    return generate.model_digest(bundle.model)


class ModelDataset(AbstractDataset[modeling.ModelBundle, modeling.ModelBundle]):
    """A model directory (safetensors + tokenizer + ``birdbone.json`` sidecar), written whole.

    The sidecar records how the model was made (``origin``) and the SHA-256 of each weight
    file, so a later stage can tell exactly which parent it came from. A bundle's masks
    travel with it as ``masks.safetensors``, a quantized model's grids and scales as
    ``quant.safetensors`` and its quantization-error corrections, if any, as a peft LoRA
    adapter in ``adapter/``.
    """

    replaces_folder = True  # the run's check refuses a path bird-bone did not write (core.io.check_replaceable)

    def __init__(
        self, path: str, dtype: str = "float32", metadata: dict[str, Any] | None = None, overwrite: bool = False
    ):
        self._path = Path(path)
        self._dtype = modeling.DTYPES[dtype]
        self.metadata = metadata
        self._overwrite = overwrite  # replace a folder bird-bone did not write (an explicit --overwrite)

    def load(self) -> modeling.ModelBundle:
        if not (self._path / SIDECAR).is_file():
            raise DatasetError(
                f"{self._path} is not a finished bird-bone model (no {SIDECAR}); run the stage that writes it."
            )
        bundle = modeling.load_model_dir(self._path, self._dtype)
        bundle.origin = json.loads((self._path / SIDECAR).read_text())["origin"]
        if (self._path / MASKS).is_file():
            bundle.masks = MaskSet.load(self._path / MASKS)
        if (self._path / QUANT_FILE).is_file():
            bundle.quant = QuantTable.load(self._path / QUANT_FILE)
            bundle.quant.corrections = load_adapter(self._path / ADAPTER_DIR, bundle.quant.corrected)
        return bundle

    def save(self, data: modeling.ModelBundle) -> None:
        modeling.check_finite(
            data.model,
            f"the model to be saved as {self._path}",
            "nothing was written; this is a bug in the stage that made it (the decay gate reverts waves "
            "that go non-finite): please report it with the run's log.",
        )
        with atomic_dir(self._path, self._overwrite) as tmp:
            modeling.save_model(data, tmp)
            if data.masks is not None:
                data.masks.save(tmp / MASKS)
            if data.quant is not None:
                data.quant.save(tmp / QUANT_FILE)
                save_adapter(tmp / ADAPTER_DIR, data.quant.corrections)
            write_sidecar(tmp, data.origin)
        data.path = self._path
        runstate.record(self._path)

    def _exists(self) -> bool:
        return runstate.finished(self._path, (self._path / SIDECAR).is_file())

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


class TensorsDataset(AbstractDataset[dict[str, torch.Tensor], dict[str, torch.Tensor]]):
    """A dict of tensors as one safetensors file."""

    def __init__(self, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> dict[str, torch.Tensor]:
        return load_file(self._path)

    def save(self, data: dict[str, torch.Tensor]) -> None:
        with atomic_path(self._path) as tmp:
            save_file({k: v.contiguous() for k, v in data.items()}, tmp)
        runstate.record(self._path)

    def _exists(self) -> bool:
        return runstate.finished(self._path, self._path.is_file())

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


def merge_json(path: Path, data: dict[str, Any]) -> None:
    """Updates the top-level keys of the JSON file at ``path`` with ``data`` (atomically),
    unless the file belongs to another recipe (``recipe_hash`` differs): then it starts afresh."""
    out = dict(data)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("recipe_hash") == data.get("recipe_hash"):
            out = {**old, **data}
    write_json_atomic(path, out)


class JSONDataset(AbstractDataset[dict[str, Any], dict[str, Any]]):
    """A JSON report. With ``merge: true`` a save updates the top-level keys of the file
    already there (so each pipeline adds its section to ``summary.json``), unless the file
    belongs to another recipe (``recipe_hash`` differs), which starts it afresh."""

    def __init__(self, path: str, merge: bool = False, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self._merge = merge
        self.metadata = metadata

    def load(self) -> dict[str, Any]:
        return json.loads(self._path.read_text())

    def save(self, data: dict[str, Any]) -> None:
        if self._merge:
            merge_json(self._path, data)
        else:
            write_json_atomic(self._path, data)
        runstate.record(self._path, shared=self._merge)

    def _exists(self) -> bool:
        return runstate.finished(self._path, self._path.is_file(), shared=self._merge)

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "merge": self._merge}


class FigureDataset(AbstractDataset[Any, bytes]):
    """A matplotlib figure saved as PNG (written atomically, then closed)."""

    def __init__(self, path: str, dpi: int = 110, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self._dpi = dpi
        self.metadata = metadata

    def load(self) -> bytes:
        return self._path.read_bytes()

    def save(self, data: Any) -> None:
        from birdbone.core.plots import png_bytes

        write_bytes_atomic(self._path, png_bytes(data, self._dpi, tight=True))
        runstate.record(self._path)

    def _exists(self) -> bool:
        return runstate.finished(self._path, self._path.is_file())

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


@dataclass
class ModelRef:
    """A model directory loaded only when asked (``load``): the dense teacher of a live
    distillation (``heal.distill_top_k: null``), which other recipes never hold in memory."""

    path: Path
    dtype: str = "float32"

    def load(self) -> modeling.ModelBundle:
        return ModelDataset(str(self.path), self.dtype).load()


class ModelRefDataset(AbstractDataset[Any, ModelRef]):
    """A read-only reference to a model directory another dataset writes (``ModelRef``)."""

    def __init__(self, path: str, dtype: str = "float32", metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self._dtype = dtype
        self.metadata = metadata

    def load(self) -> ModelRef:
        return ModelRef(self._path, self._dtype)

    def save(self, data: Any) -> None:
        raise DatasetError(f"{self._path} is referenced read-only here; the stage that writes it saves it")

    def _exists(self) -> bool:
        return (self._path / SIDECAR).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


@dataclass
class WaveHandle:
    """A finished wave directory, read lazily: its id and table at once, the model when
    ``state()`` is called (a resumed run never loads the waves it skips)."""

    path: Path
    info: dict[str, Any]
    dtype: torch.dtype = torch.float32

    @property
    def state_id(self) -> str:
        return self.info["state_id"]

    def state(self) -> waves.WaveState:
        return waves.load_state(self.path, self.dtype)


class WaveDataset(AbstractDataset[Any, WaveHandle | None]):
    """One wave's directory ``models/waves/wave_<k>``: the model (loadable as a model
    directory), its masks, the deltas still undoable, and ``wave.json`` (id, gate, table),
    written whole and atomically. Saving a ``WaveHandle`` of the same id (a wave a resumed
    run skipped) leaves the directory as it is.

    ``optional: true`` loads as None when the wave has not finished (the resume check)."""

    replaces_folder = True

    def __init__(
        self, path: str, dtype: str = "float32", optional: bool = False, metadata: dict[str, Any] | None = None
    ):
        self._path = Path(path)
        self._dtype = modeling.DTYPES[dtype]
        self._optional = optional
        self.metadata = metadata

    def load(self) -> WaveHandle | None:
        info = waves.read_state_info(self._path)
        if info is None:
            if self._optional:
                return None
            raise DatasetError(f"{self._path} is not a finished wave (no {waves.STATE_FILE}); run the wave first.")
        return WaveHandle(self._path, info, self._dtype)

    def save(self, data: Any) -> None:
        if isinstance(data, WaveHandle):
            info = waves.read_state_info(self._path)
            if info is None or info["state_id"] != data.state_id:
                raise DatasetError(f"{self._path} does not hold wave state {data.state_id} to keep")
            runstate.record(self._path)
            return
        model_from = data.current.get("model_from")
        for stale in self._path.parent.glob(f"{TMP_PREFIX}{self._path.name}.*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_dir(self._path) as tmp:
            waves.save_state(data, tmp, model_from)
            if model_from is None:
                write_sidecar(tmp, {**data.bundle.origin, "wave": data.wave, "state_id": data.state_id})
        runstate.record(self._path)

    def _exists(self) -> bool:
        return runstate.finished(self._path, waves.read_state_info(self._path) is not None)

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "optional": self._optional}
