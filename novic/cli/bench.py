"""`novic-bench`: Benchmark a bundle against the original-style PyTorch pipeline."""
import typer

from novic.cli._common import not_yet, run_app

app = typer.Typer(help="Benchmark a bundle against the original-style PyTorch pipeline.", add_completion=False, no_args_is_help=False)


@app.callback(invoke_without_command=True)
def main_command():
    """Benchmark a bundle against the original-style PyTorch pipeline."""
    not_yet("novic-bench", 7)


def main():
    run_app(app)
