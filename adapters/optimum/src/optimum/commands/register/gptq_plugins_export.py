"""Registers `optimum-cli export gptq` (Optimum imports every module of this namespace at start-up)."""

from optimum.commands.export.base import ExportCommand

from gptq_plugins_optimum.command import GPTQExportCommand

REGISTER_COMMANDS = [(GPTQExportCommand, ExportCommand)]
