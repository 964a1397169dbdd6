"""The `topkattn` command line: a thin Click group; each command lives in its own module.

The command modules import only Click at load time (the library is imported inside each
command), so ``topkattn --help`` starts fast.
"""
import click

from topkattn.cli.common import CONTEXT_SETTINGS, OneLineGroup
from topkattn.cli.embed import embed
from topkattn.cli.eval import eval_cmd
from topkattn.cli.export import export
from topkattn.cli.generate import generate
from topkattn.cli.plot import plot
from topkattn.cli.train_toy import train_toy


@click.group(cls=OneLineGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="topkattn")
def main():
    """Forgetful top-k attention, MLA and LoRANN: train, evaluate, generate, export, plot and embed."""


main.add_command(train_toy)
main.add_command(eval_cmd)
main.add_command(embed)
main.add_command(generate)
main.add_command(export)
main.add_command(plot)
