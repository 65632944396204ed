"""`novic-import`: Import a released NOVIC checkpoint (.train or release .zip)."""
import typer

from novic.cli._common import not_yet, run_app

app = typer.Typer(help="Import a released NOVIC checkpoint (.train or release .zip).", add_completion=False, no_args_is_help=False)


@app.callback(invoke_without_command=True)
def main_command():
    """Import a released NOVIC checkpoint (.train or release .zip)."""
    not_yet("novic-import", 6)


def main():
    run_app(app)
