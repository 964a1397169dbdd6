"""The `topkattn` command line: a thin Click group; each command lives in its own module."""
import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="topkattn")
def main():
    """Forgetful top-k attention, MLA and LoRANN: train, evaluate and embed."""


# Commands register here, one line each (import inside the module keeps startup light).
from topkattn.cli.train_toy import train_toy; main.add_command(train_toy)  # noqa: E402
from topkattn.cli.eval import eval_cmd; main.add_command(eval_cmd, name="eval")  # noqa: E402
from topkattn.cli.embed import embed; main.add_command(embed)  # noqa: E402
