"""`novic-run`: Classify images with a bundle."""
import typer

from novic.cli._common import not_yet, run_app

app = typer.Typer(help="Classify images with a bundle.", add_completion=False, no_args_is_help=False)


@app.callback(invoke_without_command=True)
def main_command():
    """Classify images with a bundle."""
    not_yet("novic-run", 5)


def main():
    run_app(app)
