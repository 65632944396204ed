"""novic.inputs: what files, directories and glob patterns name, for every command that reads images."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from novic.inputs import expand_inputs, image_files


def test_directories_patterns_and_files_expand_in_order_without_repeats(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/2.PNG", "a/1.jpg", "a/notes.txt", "a/deep/3.webp", "odd.dat"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "nested" / "sub").mkdir(parents=True)
    a = tmp_path / "a"
    inputs, problems = expand_inputs([str(a), str(tmp_path / "odd.dat"), str(a / "1.jpg"), str(tmp_path / "gone.jpg"),
                                      str(tmp_path / "*.png"), str(tmp_path / "empty"), str(tmp_path / "nested")])
    assert inputs == [str(a / "1.jpg"), str(a / "2.PNG"), str(tmp_path / "odd.dat"), str(tmp_path / "gone.jpg")]
    assert problems == [f"{tmp_path / '*.png'}: no files match this pattern",
                        f"{tmp_path / 'empty'}: directory has no image files",
                        f"{tmp_path / 'nested'}: directory has no image files (use --recursive for its subdirectories)"]
    inputs, problems = expand_inputs([str(tmp_path / "**" / "*.webp"), str(a)], recursive=True)
    assert inputs == [str(a / "deep" / "3.webp"), str(a / "1.jpg"), str(a / "2.PNG")] and problems == []
    assert image_files(a, recursive=False) == [str(a / "1.jpg"), str(a / "2.PNG")]


def test_the_labelling_job_and_the_evaluation_expand_inputs_without_the_cli_s_packages(tmp_path):
    """Ray workers and a runtime-only install read inputs without typer and rich (the CLI's)."""
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "1.png").write_bytes(b"x")
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("typer", "rich", "click"):
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked in this test)", name=name)
        sys.meta_path.insert(0, Block())
        from novic.evaluation import read_dataset
        from novic.serve.ray_label import expand
        print(len(expand([{str(tmp_path)!r}])[0]), len(read_dataset({str(tmp_path)!r})))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["1", "1"], result.stderr
