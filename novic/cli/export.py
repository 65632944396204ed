"""`novic-export`: Export a checkpoint to an ONNX/TensorRT bundle."""
import typer

from novic.cli._common import not_yet, run_app

app = typer.Typer(help="Export a checkpoint to an ONNX/TensorRT bundle.", add_completion=False, no_args_is_help=False)


@app.callback(invoke_without_command=True)
def main_command():
    """Export a checkpoint to an ONNX/TensorRT bundle."""
    not_yet("novic-export", 4)


def main():
    run_app(app)
