"""What every console script does with errors (novic.cli._common.run_app) and novic-bench's
argument checks, which come before minutes of measuring."""
import pytest
import typer
from typer.testing import CliRunner


def test_os_errors_are_one_line(capsys, monkeypatch):
    from novic.cli._common import run_app

    monkeypatch.setattr("sys.argv", ["novic-something"])
    app = typer.Typer()

    @app.command()
    def write():
        raise PermissionError(13, "Permission denied", "/sys/out.json")

    with pytest.raises(SystemExit) as exit_info:
        run_app(app)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: /sys/out.json: Permission denied; check the path and its permissions, "
                                "or choose another location"]


@pytest.mark.parametrize("args, message", [
    (["--reps", "0"], "Invalid value for '--reps'"),
    (["--json", "/no/such/dir/r.json"], "/no/such/dir: directory not found; create it or choose another --json path"),
])
def test_bench_checks_arguments_before_measuring(tmp_path, args, message):
    from novic.cli.bench import app

    out = CliRunner().invoke(app, ["run", str(tmp_path / "not-a-bundle"), *args])
    assert out.exit_code == 2 and message in out.output   # before the bundle is even opened


@pytest.mark.parametrize("args, message", [
    (["trt", "B", "--precision", "int4"], "'int4' is not one of fp32, fp16, int8, fp8"),
    (["calib", "B", "--min-cosine", "2"], "Invalid value for '--min-cosine'"),
    (["calib", "B", "--min-agreement", "1.5"], "Invalid value for '--min-agreement'"),
])
def test_export_rejects_impossible_values(args, message):
    from novic.cli.export import app

    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2 and message in out.output
