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


@pytest.mark.parametrize("error,line", [
    (FileNotFoundError(2, "No such file or directory", "/data/nouns.txt"),
     "/data/nouns.txt: No such file or directory; check the path and its permissions, or choose another location"),
    (FileNotFoundError("/data/cache: not a complete embedding cache;\n  rebuild it"),
     "/data/cache: not a complete embedding cache; rebuild it"),          # novic's own words, folded
    (ValueError("lr must be\n  positive"), "lr must be positive"),
])
def test_a_script_s_own_error_types_are_one_line(capsys, monkeypatch, error, line):
    """`run_app(app, *also)`: an OSError about a path names it; one raised in novic's own words
    (no file name) and the other `also` types are folded onto one line."""
    from novic.cli._common import run_app

    monkeypatch.setattr("sys.argv", ["novic-something"])
    app = typer.Typer()

    @app.command()
    def work():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run_app(app, ValueError, FileNotFoundError)
    assert exit_info.value.code == 1 and capsys.readouterr().err.splitlines() == [f"error: {line}"]


def test_bench_checks_arguments_before_measuring(tmp_path):
    from novic.cli.bench import app

    out = CliRunner().invoke(app, ["run", str(tmp_path / "not-a-bundle"), "--reps", "0"])
    assert out.exit_code == 2 and "Invalid value for '--reps'" in out.output
    (tmp_path / "a_file").write_text("x")
    out = CliRunner().invoke(app, ["run", str(tmp_path / "not-a-bundle"), "--json", str(tmp_path / "a_file" / "r.json")])
    # refused before the bundle is even opened (run_app prints an OSError as one line)
    assert isinstance(out.exception, NotADirectoryError) and out.exception.filename == str(tmp_path / "a_file")


@pytest.mark.parametrize("args, message", [
    (["trt", "B", "--precision", "int4"], "'int4' is not one of fp32, fp16, int8, fp8"),
    (["calib", "B", "--min-cosine", "2"], "Invalid value for '--min-cosine'"),
    (["calib", "B", "--min-agreement", "1.5"], "Invalid value for '--min-agreement'"),
])
def test_export_rejects_impossible_values(args, message):
    from novic.cli.export import app

    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2 and message in out.output
