"""The artifact: one directory of sharded safetensors in the GPTQ v1 layout that every host loads.

Writing is atomic (a temporary sibling directory renamed into place by `finish`), so nothing
half-written is ever found at the output path. Reading validates every tensor's name, shape and
dtype against the config before any host uses it, with errors that name the file and tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import get_torch_storage_size
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gptq_plugins.config import WRITER_MARK, ConfigError, QuantizeConfig
from gptq_plugins.packing import check_group_indices

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
REPORT_FILE = "quantization_report.json"
PROGRESS_FILE = "progress.json"
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
# Files copied from the source model directory when present.
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.jinja")
QUANTIZED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
CHECKSUM_KEY = "sha256"  # in the index's metadata: {shard: hex digest}, checked by `verify_checksums`


class ArtifactError(ValueError):
    """An artifact on disk does not match what its config promises."""


def _shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


# What an interrupted run leaves in `.<name>.partial` (nothing else may be deleted with it).
_PARTIAL_ENTRY = re.compile(r"(shard-\d{5}\.(safetensors|tmp)|progress\.json(\.tmp)?|scratch|model\.gguf)")
MAX_LISTED_ENTRIES = 5


class OutputPathError(FileExistsError):
    """Writing at the requested output would delete or overwrite something of the user's."""


def partial_dir(out_dir: Path) -> Path:
    """The hidden sibling that holds a run's shards and checkpoints until it finishes."""
    return out_dir.parent / f".{out_dir.name}.partial"


GGUF_WRITER_KEY = "general.quantized_by"  # where our GGUF files carry WRITER_MARK
GGUF_REPORT_KEY = "gptq_plugins.report"  # the quantization report (JSON) inside our GGUF files


def is_own_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file this project wrote (`general.quantized_by` carries our mark)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).get_field(GGUF_WRITER_KEY)
        return field is not None and str(field.contents()).startswith(WRITER_MARK)
    except (OSError, ValueError, KeyError, IndexError):
        return False


def is_own_artifact(path: Path) -> bool:
    """Whether `path` is an artifact this project wrote: its config marks it (`meta.quantizer`)."""
    if path.is_file():
        return is_own_gguf(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    block = config.get("quantization_config") if isinstance(config, dict) else None
    meta = block.get("meta") if isinstance(block, dict) else None
    writers = meta.get("quantizer") if isinstance(meta, dict) else None
    if isinstance(writers, str):
        writers = [writers]
    marked = isinstance(writers, list) and any(str(w).startswith(WRITER_MARK) for w in writers)
    return marked and ((path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file())


def read_report(path: str | os.PathLike) -> dict:
    """The quantization report of an output of ours: a directory's report file, or a GGUF file's key."""
    path = Path(path)
    if path.is_dir():
        return json.loads((path / REPORT_FILE).read_text())
    from gguf import GGUFReader

    field = GGUFReader(path).get_field(GGUF_REPORT_KEY)
    if field is None:
        raise ArtifactError(f"{path}: no {GGUF_REPORT_KEY} metadata; not a GGUF file written by gptq-plugins")
    return json.loads(field.contents())


def _is_own_partial(path: Path) -> bool:
    return all(_PARTIAL_ENTRY.fullmatch(entry.name) for entry in path.iterdir())


def _listing(path: Path) -> str:
    names = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in path.iterdir())
    more = len(names) - MAX_LISTED_ENTRIES
    return ", ".join(names[:MAX_LISTED_ENTRIES]) + (f" and {more} more" if more > 0 else "")


def _overlap(path: Path, source: Path, what: str) -> str | None:
    if path == source:
        return f"output: {what}{path} is the source directory; expected a separate directory"
    if source in path.parents:
        return f"output: {what}{path} is inside the source directory {source}; expected a directory outside it"
    if path in source.parents:
        return f"output: {what}{path} contains the source directory {source}; expected a directory apart from it"
    return None


def output_problem(out_dir: str | os.PathLike, *, source: str | os.PathLike | None = None,
                   overwrite: bool = False, resume: bool = False, file_output: bool = False) -> str | None:
    """Why an artifact cannot be written at `out_dir` without risk to the user's files, or None.

    The one copy of this rule: `ArtifactWriter` enforces it and the up-front checks report it.
    Neither the output nor its `.partial` sibling may be, contain or lie inside `source`;
    `overwrite` replaces only an empty directory or one of our own artifacts (with `file_output`,
    one of our own GGUF files), and removes only a `.partial` that holds nothing but what an
    interrupted run of ours leaves.
    """
    out_dir = Path(out_dir).resolve()
    partial = partial_dir(out_dir)
    if source is not None:
        source = Path(source).resolve()
        for path, what in ((out_dir, ""), (partial, "the scratch directory ")):
            problem = _overlap(path, source, what)
            if problem:
                return problem
    parent = out_dir.parent
    if not parent.exists():
        return f"output: parent directory {parent} does not exist; expected an existing directory"
    if not parent.is_dir():
        return f"output: {parent} is not a directory; expected the output's parent to be a directory"
    if out_dir.exists():
        if not overwrite:
            return f"output: {out_dir} already exists; expected a new path (or pass --overwrite to replace it)"
        if file_output:
            if not out_dir.is_file() or not is_own_gguf(out_dir):
                return (f"output: {out_dir} is not a GGUF file written by gptq-plugins; --overwrite replaces "
                        "only such a file")
        elif not out_dir.is_dir():
            return f"output: {out_dir} is a file; --overwrite replaces only a directory written by gptq-plugins"
        elif any(out_dir.iterdir()) and not is_own_artifact(out_dir):
            return (f"output: {out_dir} holds {_listing(out_dir)}, which is not an artifact written by "
                    "gptq-plugins; --overwrite replaces only such an artifact or an empty directory")
    if partial.exists() and not resume:
        if not overwrite:
            return (f"output: an interrupted run left {partial}; pass --resume to continue it or "
                    "--overwrite to start over")
        if not partial.is_dir() or not _is_own_partial(partial):
            return (f"output: {partial} holds {_listing(partial) if partial.is_dir() else 'a file'}, which is "
                    "not what an interrupted gptq-plugins run leaves; move it away first")
    try:  # the honest test: root passes os.access on paths it still cannot write
        os.rmdir(tempfile.mkdtemp(prefix=f".{out_dir.name}.probe-", dir=parent))
    except OSError as err:
        return f"output: cannot create directories in {parent} ({err.strerror}); expected a writable directory"
    return None


class ArtifactWriter:
    """Streams tensors into shards inside `.<name>.partial`, a hidden sibling of `out_dir`.

    Use as a context manager. `checkpoint(state)` makes the shards written so far and a small
    JSON state durable, so an interrupted run can continue with `resume=True`; leaving the block
    with an exception keeps the partial directory only if a checkpoint was taken (so it can be
    resumed) and removes it otherwise. `finish` writes the metadata and renames the directory
    into place: nothing half-written is ever at `out_dir`, and an earlier artifact there is
    removed only once the new one is complete. `source` is the directory the artifact is made
    from: see `output_problem` for what is refused.
    """

    def __init__(self, out_dir: str | os.PathLike, *, source: str | os.PathLike | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False, resume: bool = False,
                 file_output: bool = False):
        problem = output_problem(out_dir, source=source, overwrite=overwrite, resume=resume, file_output=file_output)
        if problem:
            raise OutputPathError(problem)
        self.out_dir = Path(out_dir).resolve()
        self.tmp_dir = partial_dir(self.out_dir)
        self.scratch = self.tmp_dir / "scratch"
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0
        self.state: dict | None = None  # the state of the last checkpoint, when resuming
        if resume:
            self._restore()
        else:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)  # checked above: an interrupted run's own
            self.tmp_dir.mkdir()

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self.state is None:
            self.abort()
        return False

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Queue tensors for the current shard; a full shard is written out at once."""
        for name, tensor in tensors.items():
            if name in self._pending or any(name in names for _, names in self._shards):
                raise ArtifactError(f"tensor {name!r} was added twice")
            size = get_torch_storage_size(tensor)
            if self._pending and self._pending_bytes + size > self.max_shard_bytes:
                self.flush()
            self._pending[name] = tensor.detach().to("cpu").contiguous()
            self._pending_bytes += size

    def flush(self) -> None:
        """Write the queued tensors as one shard (shard boundaries are part of the artifact's bytes)."""
        if not self._pending:
            return
        path = self.tmp_dir / f"shard-{len(self._shards):05d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(self._pending, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        self._shards.append((path, sorted(self._pending)))
        self._total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def checkpoint(self, state: dict) -> None:
        """Flush, then atomically record the shards and `state` (JSON) for `resume=True`."""
        self.flush()
        progress = {"shards": [[p.name, names] for p, names in self._shards],
                    "total_bytes": self._total_bytes, "state": state}
        tmp = self.tmp_dir / (PROGRESS_FILE + ".tmp")
        tmp.write_text(json.dumps(progress))
        os.replace(tmp, self.tmp_dir / PROGRESS_FILE)
        self.state = state

    def _restore(self) -> None:
        progress_file = self.tmp_dir / PROGRESS_FILE
        if not progress_file.is_file():
            raise FileNotFoundError(f"nothing to resume: {progress_file} does not exist")
        progress = json.loads(progress_file.read_text())
        self._shards = [(self.tmp_dir / name, names) for name, names in progress["shards"]]
        self._total_bytes = progress["total_bytes"]
        self.state = progress["state"]
        recorded = {p.name for p, _ in self._shards}
        for leftover in self.tmp_dir.glob("shard-*"):  # written after the last checkpoint
            if leftover.name not in recorded:
                leftover.unlink()

    def finish(self, *, model_config: dict, quantization_config: dict, report: dict | None = None,
               copy_from: str | os.PathLike | None = None) -> Path:
        """Write shards, index, config, report and copied files, then move into place."""
        self.flush()
        shutil.rmtree(self.scratch, ignore_errors=True)
        (self.tmp_dir / PROGRESS_FILE).unlink(missing_ok=True)
        total = len(self._shards)
        weight_map = {}
        for i, (path, names) in enumerate(self._shards, start=1):
            final = _shard_name(i, total)
            path.rename(self.tmp_dir / final)
            weight_map.update({name: final for name in names})
        checksums = {file: _sha256(self.tmp_dir / file) for file in sorted(set(weight_map.values()))}
        index = {"metadata": {"total_size": self._total_bytes, CHECKSUM_KEY: checksums},
                 "weight_map": dict(sorted(weight_map.items()))}
        _write_json(self.tmp_dir / INDEX_FILE, index)
        config = dict(model_config)
        config["quantization_config"] = quantization_config
        _write_json(self.tmp_dir / "config.json", config)
        if report is not None:
            _write_json(self.tmp_dir / REPORT_FILE, report)
        if copy_from is not None:
            for name in COPIED_FILES:
                src = Path(copy_from) / name
                if src.is_file():
                    shutil.copy2(src, self.tmp_dir / name)
        return self.move_into_place()

    def move_into_place(self) -> Path:
        """Rename the temporary directory to `out_dir`, replacing an existing one only at the end."""
        old = None
        if self.out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.old-", dir=self.out_dir.parent))
            os.rename(self.out_dir, old / "artifact")
        os.rename(self.tmp_dir, self.out_dir)
        if old is not None:
            shutil.rmtree(old)
        return self.out_dir

    def written_shapes(self) -> dict[str, list[int]]:
        """Name -> shape of every tensor written so far (read from the shards' headers)."""
        self.flush()
        return {name: shape for name, (_dtype, shape) in
                read_headers(self.tmp_dir, sorted(p.name for p, _ in self._shards)).items()}

    def written_tensor(self, name: str) -> torch.Tensor:
        """One tensor written so far, read back from its shard."""
        for path, names in self._shards:
            if name in names:
                with safe_open(path, framework="pt") as f:
                    return f.get_tensor(name)
        raise KeyError(f"tensor {name!r} was not written")

    def finish_file(self, built: Path) -> Path:
        """Move `built` (a file made inside the partial directory) to the output path, replacing an
        earlier output of ours only now, and remove the partial directory."""
        os.replace(built, self.out_dir)
        self.abort()
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


@dataclass(frozen=True)
class QuantizedModule:
    """Shapes of one quantized Linear, as read from its tensors."""

    name: str
    in_features: int
    out_features: int
    n_groups: int
    has_bias: bool


@dataclass
class Artifact:
    """A validated artifact directory."""

    path: Path
    config: QuantizeConfig
    model_config: dict
    weight_map: dict[str, str]
    modules: dict[str, QuantizedModule] = field(default_factory=dict)

    def tensor(self, name: str) -> torch.Tensor:
        file = self.path / self.weight_map[name]
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the artifact (loads everything into memory)."""
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted(set(self.weight_map.values())):
            with safe_open(str(self.path / file), framework="pt") as f:
                tensors.update({name: f.get_tensor(name) for name in f.keys()})
        return tensors


def read_model_config(path: str | os.PathLike) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ArtifactError(f"{file}: missing (every model/artifact directory needs config.json)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{file}: not valid JSON ({err})") from None


def read_artifact(path: str | os.PathLike) -> Artifact:
    """Open and validate an artifact; raises `ArtifactError` naming the file and tensor."""
    path = Path(path)
    model_config = read_model_config(path)
    qc = model_config.get("quantization_config")
    if qc is None:
        raise ArtifactError(f"{path / 'config.json'}: no quantization_config (not a quantized artifact)")
    try:
        config = QuantizeConfig.from_quantization_config(
            qc, source=f"{path / 'config.json'}: quantization_config",
            strict=qc.get("quant_method") == "gptq_plugins")
    except ConfigError as err:
        raise ArtifactError(str(err)) from None
    weight_map = read_weight_map(path)
    artifact = Artifact(path=path, config=config, model_config=model_config, weight_map=weight_map)
    artifact.modules = _validate_tensors(artifact)
    return artifact


def read_weight_map(path: Path) -> dict[str, str]:
    """`{tensor: file}` of a directory's safetensors, checking every listed file opens and holds its tensors."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ArtifactError(f"{index}: not a valid safetensors index ({err})") from None
    elif (path / SINGLE_FILE).is_file():
        weight_map = None
    else:
        raise ArtifactError(f"{path}: no {INDEX_FILE} or {SINGLE_FILE}")
    files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
    found: dict[str, str] = {}
    for file in files:
        full = path / file
        if not full.is_file():
            raise ArtifactError(f"{full}: listed in {INDEX_FILE} but missing")
        try:
            with safe_open(str(full), framework="pt") as f:
                found.update({name: file for name in f.keys()})
        except (SafetensorError, OSError) as err:
            raise ArtifactError(f"{full}: unreadable safetensors file, truncated or corrupted ({err})") from None
    if weight_map is not None:
        for name, file in weight_map.items():
            if found.get(name) != file:
                raise ArtifactError(f"{path / file}: tensor {name!r} listed in {INDEX_FILE} is missing")
    return found


def read_headers(path: Path, files) -> dict[str, tuple[str, list[int]]]:
    """`{tensor: (dtype, shape)}` from the headers of the safetensors `files` in `path`; reads no tensor data."""
    headers = {}
    for file in sorted(set(files)):
        with safe_open(str(path / file), framework="pt") as f:
            for name in f.keys():
                tensor_slice = f.get_slice(name)
                headers[name] = (tensor_slice.get_dtype(), list(tensor_slice.get_shape()))
    return headers


def verify_checksums(artifact: Artifact) -> int:
    """Compare every shard with the sha256 recorded when it was written; returns how many were checked
    (0 for artifacts of other writers). Reads every byte, so hosts skip it; `inspect` runs it."""
    index = artifact.path / INDEX_FILE
    metadata = json.loads(index.read_text()).get("metadata") if index.is_file() else None
    recorded = metadata.get(CHECKSUM_KEY) if isinstance(metadata, dict) else None
    if recorded is None:
        return 0
    if not isinstance(recorded, dict):
        raise ArtifactError(f"{index}: metadata.{CHECKSUM_KEY} should map shard files to hex digests")
    for file, expected in sorted(recorded.items()):
        path = artifact.path / file
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in {INDEX_FILE} metadata.{CHECKSUM_KEY} but missing")
        actual = _sha256(path)
        if actual != expected:
            raise ArtifactError(f"{path}: sha256 is {actual}, expected {expected} as recorded in {INDEX_FILE} "
                                "(the file changed after it was written)")
    return len(recorded)


def _validate_tensors(artifact: Artifact) -> dict[str, QuantizedModule]:
    """Check every quantized module's tensors against the config (shape, dtype, g_idx range,
    finite scales, no float weight beside the quantized one)."""
    cfg = artifact.config
    modules = {}
    prefixes = sorted(name[: -len(".qweight")] for name in artifact.weight_map if name.endswith(".qweight"))
    orphans = [n for n in artifact.weight_map
               if n.rsplit(".", 1)[-1] in QUANTIZED_SUFFIXES[1:] and n.rsplit(".", 1)[0] not in prefixes]
    if orphans:
        raise ArtifactError(f"{artifact.path / artifact.weight_map[orphans[0]]}: tensor {orphans[0]!r} "
                            "has no matching .qweight")
    metas = read_headers(artifact.path, artifact.weight_map.values())
    for prefix in prefixes:
        def expect(suffix, dtype, shape):
            name = f"{prefix}.{suffix}"
            if name not in metas:
                raise ArtifactError(f"{artifact.path}: tensor {name!r} is missing "
                                    f"(expected {dtype} {shape})")
            got_dtype, got_shape = metas[name]
            if got_dtype != dtype or got_shape != shape:
                raise ArtifactError(f"{artifact.path / artifact.weight_map[name]}: tensor {name!r} is "
                                    f"{got_dtype} {got_shape}, expected {dtype} {shape}")

        qweight_shape = metas[f"{prefix}.qweight"][1]
        if len(qweight_shape) != 2:
            raise ArtifactError(f"{artifact.path}: tensor {prefix}.qweight should be 2-D, got {qweight_shape}")
        packed_in, out_features = qweight_shape
        in_features = packed_in * 32 // cfg.bits
        try:
            cfg.check_layer(in_features, out_features, name=prefix)
        except ConfigError as err:
            raise ArtifactError(f"{artifact.path}: {err}") from None
        n_groups = cfg.groups_for(in_features)
        expect("qweight", "I32", [packed_in, out_features])
        expect("qzeros", "I32", [n_groups, out_features * cfg.bits // 32])
        expect("scales", "F16", [n_groups, out_features])
        expect("g_idx", "I32", [in_features])
        try:
            check_group_indices(artifact.tensor(f"{prefix}.g_idx"), n_groups, name=f"tensor {prefix}.g_idx")
        except ValueError as err:
            raise ArtifactError(f"{artifact.path / artifact.weight_map[prefix + '.g_idx']}: {err}") from None
        non_finite = int((~torch.isfinite(artifact.tensor(f"{prefix}.scales"))).sum())
        if non_finite:
            raise ArtifactError(f"{artifact.path / artifact.weight_map[prefix + '.scales']}: tensor "
                                f"'{prefix}.scales' has {non_finite} non-finite values (NaN or inf); "
                                "expected finite scales")
        if f"{prefix}.weight" in metas:
            raise ArtifactError(f"{artifact.path / artifact.weight_map[prefix + '.weight']}: tensor "
                                f"'{prefix}.weight' beside {prefix}.qweight; expected a module to be "
                                "either quantized or float, not both")
        if f"{prefix}.bias" in metas and metas[f"{prefix}.bias"][1] != [out_features]:
            raise ArtifactError(f"{artifact.path}: tensor {prefix}.bias is {metas[f'{prefix}.bias'][1]}, "
                                f"expected [{out_features}]")
        modules[prefix] = QuantizedModule(prefix, in_features, out_features, n_groups,
                                          f"{prefix}.bias" in metas)
    if not modules:
        raise ArtifactError(f"{artifact.path}: no quantized tensors (*.qweight) found")
    return modules
