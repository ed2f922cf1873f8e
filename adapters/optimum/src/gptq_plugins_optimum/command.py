"""`optimum-cli export gptq`: Optimum's exporter front end over the `gptq-plugins quantize` job.

The options come from `gptq_plugins.cli.add_quantize_arguments`, the one definition our own CLI
uses, and the job runs through the same `run_quantize`, so both commands write the same artifact.
torch and transformers are imported only in `run()`: building the parser must stay cheap because
optimum-cli builds every registered command's parser on each start.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from gptq_plugins.cli import add_quantize_arguments, run_quantize, run_reporting_errors

if TYPE_CHECKING:
    from argparse import ArgumentParser, Namespace

PROG = "optimum-cli export gptq"


class GPTQExportCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="gptq", help="GPTQ-quantize a local model into a gptq-plugins artifact "
                          "(the options of `gptq-plugins quantize`)")

    @staticmethod
    def parse_args(parser: "ArgumentParser") -> None:
        parser.add_argument("-m", "--model", required=True,
                            help="local model directory (config.json + safetensors)")
        parser.add_argument("output", help="artifact directory to create")
        add_quantize_arguments(parser)

    def run(self) -> None:
        status = run_reporting_errors(PROG, _quantize, self.args)
        if status:
            sys.exit(status)


def _quantize(args: "Namespace") -> None:
    run_quantize(args.model, args.output, args)
