"""`gptq-plugins convert IN OUT`: the same checkpoint under the other `quant_method` (gptq <-> gptq_plugins).

Both methods share the GPTQ v1 tensor layout, so only `config.json`'s `quant_method` changes.
Stock GPTQ checkpoints cannot be claimed by a second Transformers quantizer; converting them to
`gptq_plugins` lets our loaders take them, and the reverse hands our artifacts to stock loaders.
Every tensor is validated first (`read_artifact`); tensor files are hard-linked (copied across
filesystems), never rewritten; the output appears atomically.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from gptq_plugins.artifact import ArtifactWriter, read_artifact
from gptq_plugins.config import QUANT_METHOD, WRITER_MARK, ConfigError, QuantizeConfig

OTHER_METHOD = {QUANT_METHOD: "gptq", "gptq": QUANT_METHOD}
# Errors of os.link that mean "cannot link here" rather than "something is wrong".
_LINK_UNSUPPORTED = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


@dataclass(frozen=True)
class Conversion:
    """What `convert_checkpoint` did."""

    path: Path
    source_method: str
    target_method: str
    linked: tuple[str, ...]
    copied: tuple[str, ...]


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link `src` at `dst` (True), or copy it where links cannot be made (False)."""
    try:
        os.link(src, dst)
        return True
    except OSError as err:
        if err.errno not in _LINK_UNSUPPORTED:
            raise
    shutil.copy2(src, dst)
    return False


def _with_writer_mark(meta) -> dict:
    """`meta` with our entry added to its `quantizer` list (other writers' entries kept), so the
    converted checkpoint is known as our output (see `artifact.output_problem`)."""
    from gptq_plugins.version import __version__

    meta = dict(meta) if isinstance(meta, dict) else {}
    writers = meta.get("quantizer") or []
    writers = [writers] if isinstance(writers, str) else list(writers)
    if not any(str(w).startswith(WRITER_MARK) for w in writers):
        writers.append(f"{WRITER_MARK}{__version__}")
    meta["quantizer"] = writers
    return meta


def convert_checkpoint(source: str | os.PathLike, output: str | os.PathLike, *, to: str | None = None,
                       overwrite: bool = False) -> Conversion:
    """Write `output`: `source` with `quant_method` set to `to` (default: the other method)."""
    source = Path(source).resolve()
    artifact = read_artifact(source)
    block = dict(artifact.model_config["quantization_config"])
    current = block.get("quant_method", QUANT_METHOD)
    target = to or OTHER_METHOD[current]
    if target not in OTHER_METHOD:
        raise ConfigError("to", f"expected one of {sorted(OTHER_METHOD)}, got {target!r}")
    if target == current:
        raise ConfigError("to", f"{source} already has quant_method {current!r}")
    block["quant_method"] = target
    block["meta"] = _with_writer_mark(block.get("meta"))
    # The converted block must be one its loaders accept (ours reads strictly).
    QuantizeConfig.from_quantization_config(
        block, source=f"{source / 'config.json'}: quantization_config as {target!r}", strict=target == QUANT_METHOD)
    tensor_files = set(artifact.weight_map.values())
    linked, copied = [], []
    with ArtifactWriter(output, source=source, overwrite=overwrite) as writer:
        for entry in sorted(source.iterdir()):
            destination = writer.tmp_dir / entry.name
            if entry.name == "config.json":
                config = {**artifact.model_config, "quantization_config": block}
                destination.write_text(json.dumps(config, indent=2) + "\n")
            elif entry.is_dir():
                shutil.copytree(entry, destination)
            elif entry.name in tensor_files:
                (linked if _link_or_copy(entry, destination) else copied).append(entry.name)
            else:
                shutil.copy2(entry, destination)
        path = writer.move_into_place()
    return Conversion(path, current, target, tuple(linked), tuple(copied))
