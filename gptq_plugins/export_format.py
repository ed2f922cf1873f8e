"""What an output format is, as plugins register it (`gptq_plugins_export_formats`)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ExportFormat:
    """An output format: how a run's results become files (see `gptq_plugins_export_formats`)."""

    # (writer, model, layout, config, progress=...) -> an assembly like `ArtifactAssembly`; or its
    # "module:attribute" name, imported only when a run uses the format (as entry points are).
    assembly: Callable | str
    single_file: bool = False  # the output is one file (e.g. .gguf), not a directory
    description: str = ""

    def assembly_class(self) -> Callable:
        if not isinstance(self.assembly, str):
            return self.assembly
        module, _, attribute = self.assembly.partition(":")
        return getattr(importlib.import_module(module), attribute)
